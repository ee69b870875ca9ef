"""python -m llama.serve: an OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m llama.serve --ckpt_dir CKPT [--host 127.0.0.1 --port 8000 --api-key KEY]
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir CKPT      # model parallel

Endpoints: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, GET /health. Concurrent requests share the engine's decode steps.
Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

This module is the HTTP layer only (FastAPI on uvicorn): it checks and tokenizes requests, hands
them to llama.serve_engine.EngineService and turns the tokens that come back into OpenAI's JSON.
Under torchrun, rank 0 serves HTTP and every rank runs the engine loop.
"""

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from .cli import path_flags
from .distributed import all_ranks_agree, is_main_rank
from .engine import MAX_TOP_LOGPROBS, Request, check_prompt
from .errors import LlamaError
from .generation import Llama
from .sampling import check_sampling, request_key
from .serve_engine import EngineService, QueueFull, Update
from .serve_text import TextStream, split_stops

try:  # the `serve` extra: pip install -e .[serve]
    import uvicorn
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
except ImportError as _missing:  # pragma: no cover - the message says what to do
    _HOW = (f"python -m llama.serve needs the HTTP stack ({_missing.name} is not installed); install it "
            f"with: pip install -e '.[serve]'")
    if __name__ == "__main__":
        sys.exit(f"error: {_HOW}")  # one line, as every CLI's errors
    raise LlamaError(_HOW) from None

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any max_seq_len of text
COMPLETION_LOGPROBS_MAX = 5  # /v1/completions' `logprobs` (an int), as OpenAI's legacy API


class APIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- limits on every request: the API key and the body size ----------------------------------

class Guard:
    """ASGI middleware: 401 unless the request carries `Authorization: Bearer <api_key>` (when
    a key is set), 413 for a body over max_bytes. The body is read here, up to the limit, so
    that a body sent without Content-Length is limited too."""

    def __init__(self, app, api_key: Optional[str], max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                       "<key>' with the key this server was started with (--api-key)",
                                  code="invalid_api_key").response()(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than this server takes ({self.max_bytes} "
                                  f"bytes, --max_request_bytes); send a shorter prompt",
                             code="request_too_large").response()
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())


# ---- reading a request's arguments ----------------------------------------------------------

def _flag(body: Dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name}={value!r:.80} must be true or false", param=name)
    return value


def _whole(body: Dict[str, Any], name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    """An integer argument in [low, high], or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        limits = f"from {low} to {high}" if high is not None else f">= {low}"
        raise APIError(400, f"{name}={value!r:.80} must be an integer {limits} (or left out)", param=name)
    return value


@dataclass
class Job:
    """A checked request: what the engine runs and how the answer is to be written."""
    request: Request
    stops: Tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    prompt_text: Optional[str] = None  # /v1/completions: the prompt's text, which the answer continues
    echo: bool = False  # the answer's text starts with prompt_text
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Piece:
    """Part of an answer: new text, the tokens it came from (token, logprob, top alternatives),
    and, on the last piece, why the answer ended and the prompt's logprobs (echo)."""
    text: str
    tokens: List[Tuple[int, float, Optional[List[Tuple[int, float]]]]]
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[List[float]] = None


@dataclass
class Submission:
    """A queued request and the queue its engine updates arrive in (on the event loop)."""
    service: EngineService
    ident: int
    updates: "asyncio.Queue[Update]"
    finished: bool = False

    def close(self) -> None:
        """Cancel the request unless it has finished: its row is freed before the next step."""
        if not self.finished:
            self.finished = True
            self.service.cancel(self.ident)

    @contextlib.asynccontextmanager
    async def closing(self, pieces: AsyncIterator[Piece]) -> AsyncIterator[AsyncIterator[Piece]]:
        """`pieces`, closed at the end of the block, and the request cancelled if unfinished
        (even when the block ends before `pieces` started)."""
        try:
            async with contextlib.aclosing(pieces):
                yield pieces
        finally:
            self.close()


class OpenAIServer:
    """The HTTP endpoints over a Llama and the EngineService that runs its engine."""

    def __init__(self, generator: Llama, service: EngineService, model_name: str):
        self.generator, self.service, self.model_name = generator, service, model_name
        self.tokenizer = generator.tokenizer
        self.max_seq_len = generator.model.params.max_seq_len
        self.vocab_size = generator.model.params.vocab_size

    def app(self, api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        """The ASGI application."""
        app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(HTTPException, self._http_error)
        app.add_exception_handler(Exception, self._bug)
        return Guard(app, api_key, max_request_bytes)

    @staticmethod
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response()

    @staticmethod
    async def _http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape."""
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    @staticmethod
    async def _bug(request: HTTPRequest, exc: Exception) -> JSONResponse:
        """An error of ours, not the client's: 500 in OpenAI's shape (the traceback goes to stderr)."""
        traceback.print_exception(exc)
        return APIError(500, f"{type(exc).__name__}: {exc} (a bug in llama: please report it)",
                        "server_error").response()

    # ---- endpoints -------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if self.service.stopping.is_set():
            return APIError(503, "the server is shutting down", "server_error").response()
        return JSONResponse({"status": "ok", **self.service.status()})

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "llama",
            "max_model_len": self.max_seq_len}]})

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        job = self._job(body, self._dialog_tokens(body), self.generator.formatter.stop_tokens,
                        logprobs=_flag(body, "logprobs"), top=_whole(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0)
        if job.request.top_logprobs and not job.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return await self._respond(job, request, "chatcmpl", "chat.completion", self._chat_chunks,
                                   lambda text, tokens, last: {
                                       "message": {"role": "assistant", "content": text},
                                       "logprobs": self._chat_logprobs(tokens) if job.logprobs else None})

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        prompt = self._prompt_tokens(body)
        top = _whole(body, "logprobs", 0, COMPLETION_LOGPROBS_MAX)
        job = self._job(body, prompt, self.tokenizer.stop_tokens, logprobs=top is not None, top=top or 0,
                        echo=_flag(body, "echo"))
        job.prompt_text, job.echo = self.tokenizer.decode(prompt), _flag(body, "echo")
        return await self._respond(job, request, "cmpl", "text_completion", self._completion_chunks,
                                   lambda text, tokens, last: {
                                       "text": job.prompt_text + text if job.echo else text,
                                       "logprobs": self._completion_logprobs(job, tokens, last.prompt_logprobs)
                                       if job.logprobs else None})

    async def _respond(self, job: "Job", request: HTTPRequest, prefix: str, kind: str, chunks, choice) -> Response:
        """The answer as a stream of chunks (chunks(job, id, submission)), or whole: an object
        `kind` whose one choice holds choice(text, tokens, last piece) and its finish_reason."""
        answer_id = f"{prefix}-{secrets.token_hex(12)}"
        if job.stream:
            return self._sse(chunks(job, answer_id, self._submit(job)))
        pieces = await self._collect(job, request)
        text, tokens = "".join(p.text for p in pieces), [t for p in pieces for t in p.tokens]
        return JSONResponse({
            "id": answer_id, "object": kind, "created": job.created, "model": self.model_name,
            "choices": [{"index": 0, **choice(text, tokens, pieces[-1]), "finish_reason": pieces[-1].finish_reason}],
            "usage": self._usage(job, tokens)})

    # ---- requests in ---------------------------------------------------------------------

    async def _body(self, request: HTTPRequest) -> Dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model={model!r:.80} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        n = body.get("n")
        if n is not None and n != 1:
            raise APIError(400, f"n={n!r:.80}: this server gives one choice per request; leave n out (or 1) "
                                f"and send several requests", param="n")
        return body

    def _dialog_tokens(self, body: Dict[str, Any]) -> List[int]:
        """The chat prompt of `messages`, in the model's chat format."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects", param="messages")
        dialog = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, f"messages[{i}].content: this model reads text parts only "
                                        f"({{'type': 'text', 'text': ...}})", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            role = "system" if message.get("role") == "developer" else message.get("role")
            dialog.append({"role": role, "content": content})
        formatter = self.generator.formatter
        try:
            formatter.check_dialog(dialog)
        except LlamaError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if formatter.is_unsafe(dialog):
            raise APIError(400, formatter.UNSAFE_ERROR, param="messages")
        return formatter.encode_dialog_prompt(dialog)

    def _prompt_tokens(self, body: Dict[str, Any]) -> List[int]:
        """`prompt`: a string, token ids, or a list of one of either."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise APIError(400, f"prompt={prompt!r:.80} must be a string or a list of token ids (one prompt per "
                            f"request: send several requests for several prompts)", param="prompt")

    def _job(self, body: Dict[str, Any], prompt: List[int], stop_tokens, logprobs: bool, top: int,
             echo: bool = False) -> Job:
        """The engine request for `prompt` with the body's sampling arguments, checked."""
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's defaults
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        try:
            temperature, top_p, _ = check_sampling(temperature, top_p, None)
        except LlamaError as exc:
            raise APIError(400, str(exc), param=str(exc).partition("=")[0]) from None
        max_tokens = _whole(body, "max_completion_tokens", 1)
        max_tokens = _whole(body, "max_tokens", 1) if max_tokens is None else max_tokens
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"seed={seed!r:.80} must be an integer (or left out)", param="seed")
        try:
            stops = split_stops(body.get("stop"))
        except ValueError as exc:
            raise APIError(400, str(exc), param="stop") from None
        try:
            check_prompt(prompt, self.max_seq_len, self.vocab_size, "the prompt")
        except LlamaError as exc:
            code = "context_length_exceeded" if len(prompt) > self.max_seq_len else None
            raise APIError(400, str(exc), param="messages" if "messages" in body else "prompt", code=code) from None
        room = self.max_seq_len - len(prompt)
        if room == 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens={max_tokens or 1} more are "
                                f"asked for, over this server's context of max_seq_len={self.max_seq_len} tokens; "
                                f"shorten the prompt or ask for fewer tokens", param="max_tokens",
                           code="context_length_exceeded")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # seed s samples as chat_completion([dialog], seed=s) does (the key of input position 0).
        key = 0 if temperature == 0 else request_key(seed, 0) if seed is not None else secrets.randbits(62)
        request = Request(prompt, max_tokens or room, temperature, top_p, key, tuple(stop_tokens),
                          logprobs, prompt_logprobs=echo and logprobs, top_logprobs=top)
        return Job(request, stops, _flag(body, "stream"), include_usage, logprobs)

    # ---- answers out ---------------------------------------------------------------------

    def _submit(self, job: Job) -> "Submission":
        """Queue the job now (503 when the server is full)."""
        loop = asyncio.get_running_loop()
        updates: "asyncio.Queue[Update]" = asyncio.Queue()

        def post(update: Update) -> None:  # called by the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits
                loop.call_soon_threadsafe(updates.put_nowait, update)

        try:
            ident = self.service.submit(job.request, post)
        except QueueFull as exc:
            raise APIError(503, str(exc), "server_error", code="queue_full") from None
        except LlamaError as exc:
            raise APIError(503, str(exc), "server_error") from None
        return Submission(self.service, ident, updates)

    async def _pieces(self, job: Job, submission: "Submission") -> AsyncIterator[Piece]:
        """The answer's text as it becomes final (see llama.serve_text); the request is cancelled
        if this ends early (a client that went away) or a stop string ends the text."""
        text = TextStream(self.tokenizer, job.stops, job.request.prompt_tokens if job.prompt_text is not None else ())
        tokens: List[Tuple[int, float, Optional[List[Tuple[int, float]]]]] = []  # not yet sent
        try:
            while True:
                update = await submission.updates.get()
                finished = update.finish_reason is not None
                if finished:
                    submission.finished = True
                if update.finish_reason in ("error", "cancelled"):
                    error = update.error or LlamaError("the request was cancelled")
                    message = str(error) if isinstance(error, LlamaError) else f"{type(error).__name__}: {error}"
                    raise APIError(500, f"generation failed: {message}", "server_error")
                if update.token is not None:
                    text.add(update.token)
                    tokens.append((update.token, update.logprob, update.top))
                piece = text.finish() if finished else text.take()
                if text.stopped or finished:
                    yield Piece(piece, tokens, "stop" if text.stopped else update.finish_reason,
                                update.prompt_logprobs)
                    return
                if piece:
                    yield Piece(piece, tokens)
                    tokens = []
        finally:
            submission.close()

    async def _collect(self, job: Job, http: HTTPRequest) -> List[Piece]:
        """Every piece of a non-streamed answer; cancelled if the client goes away meanwhile."""
        submission = self._submit(job)

        async def gather() -> List[Piece]:
            try:
                return [p async for p in self._pieces(job, submission)]
            finally:
                submission.close()

        task = asyncio.ensure_future(gather())
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "the client closed the connection")
        return task.result()

    def _sse(self, chunks: AsyncIterator[Dict[str, Any]]) -> StreamingResponse:
        """Server-sent events: each chunk as a `data:` line, then `data: [DONE]`; an error that
        comes after the first chunk is sent as an event in OpenAI's error shape."""
        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(chunks):
                try:
                    async for chunk in chunks:
                        yield f"data: {json.dumps(chunk)}\n\n"
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chat_chunks(self, job: Job, answer_id: str, submission: "Submission") -> AsyncIterator[Dict[str, Any]]:
        def chunk(delta: Dict[str, Any], logprobs=None, finish: Optional[str] = None) -> Dict[str, Any]:
            out = {"id": answer_id, "object": "chat.completion.chunk", "created": job.created, "model": self.model_name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            return {**out, "usage": None} if job.include_usage else out

        sent: List[Tuple[int, float, Any]] = []
        async with submission.closing(self._pieces(job, submission)) as pieces:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in pieces:
                if piece.text or piece.tokens:
                    logprobs = self._chat_logprobs(piece.tokens, sent) if job.logprobs else None
                    yield chunk({"content": piece.text}, logprobs)
                sent += piece.tokens
                if piece.finish_reason is not None:
                    yield chunk({}, None, piece.finish_reason)
        if job.include_usage:
            yield {"id": answer_id, "object": "chat.completion.chunk", "created": job.created,
                   "model": self.model_name, "choices": [], "usage": self._usage(job, sent)}

    async def _completion_chunks(self, job: Job, answer_id: str,
                                 submission: "Submission") -> AsyncIterator[Dict[str, Any]]:
        def chunk(text: str, logprobs=None, finish: Optional[str] = None) -> Dict[str, Any]:
            out = {"id": answer_id, "object": "text_completion", "created": job.created, "model": self.model_name,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            return {**out, "usage": None} if job.include_usage else out

        sent: List[Tuple[int, float, Any]] = []
        async with submission.closing(self._pieces(job, submission)) as pieces:
            if job.echo:
                yield chunk(job.prompt_text)
            async for piece in pieces:
                sent += piece.tokens
                if piece.text or piece.tokens:
                    logprobs = self._completion_logprobs(job, piece.tokens, None) if job.logprobs else None
                    yield chunk(piece.text, logprobs)
                if piece.finish_reason is not None:
                    yield chunk("", None, piece.finish_reason)
        if job.include_usage:
            yield {"id": answer_id, "object": "text_completion", "created": job.created, "model": self.model_name,
                   "choices": [], "usage": self._usage(job, sent)}

    # ---- formatting ------------------------------------------------------------------------

    def _usage(self, job: Job, tokens: List[Any]) -> Dict[str, int]:
        prompt = len(job.request.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}

    def _piece(self, token: int, before: Sequence[int] = ()) -> str:
        """The text `token` adds after the tokens `before` (a few are enough: a word's leading
        space, a character split over byte tokens), or its text alone where that is unclear."""
        context = self.tokenizer.decode(list(before[-8:]))
        text = self.tokenizer.decode(list(before[-8:]) + [token])
        return text[len(context):] if text.startswith(context) else self.tokenizer.decode([token])

    def _chat_logprobs(self, tokens, before: Sequence[Tuple[int, float, Any]] = ()) -> Dict[str, Any]:
        """OpenAI's chat logprobs of `tokens`, which follow the tokens `before` (already sent)."""
        def entry(token: int, logprob: float, before: List[int]) -> Dict[str, Any]:
            text = self._piece(token, before)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        context = [t for t, _, _ in before][-8:]
        ids = context + [t for t, _, _ in tokens]
        content = []
        for i, (token, logprob, top) in enumerate(tokens):
            prior = ids[: len(context) + i]
            alternatives = [entry(a, alp, prior) for a, alp in top or []]
            content.append({**entry(token, logprob, prior), "top_logprobs": alternatives})
        return {"content": content}

    def _completion_logprobs(self, job: Job, tokens, prompt_logprobs: Optional[List[float]]) -> Dict[str, Any]:
        """OpenAI's legacy logprobs; with echo (non-streamed), the prompt's tokens first (the first
        token's logprob None, as it has no context; their alternatives are not computed: None)."""
        entries: List[Tuple[int, Optional[float], Any]] = []
        if prompt_logprobs is not None:
            entries = [(t, lp if i else None, None)
                       for i, (t, lp) in enumerate(zip(job.request.prompt_tokens, prompt_logprobs))]
        entries += tokens
        ids = [t for t, _, _ in entries]
        texts = [self._piece(t, ids[:i]) for i, t in enumerate(ids)]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self._piece(a, ids[:i]): alp for a, alp in top}
                                 for i, (_, _, top) in enumerate(entries)],
                "text_offset": offsets}


# ---- the command ---------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a LlamaError that says why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise LlamaError(f"cannot listen on --host {host} --port {port}: {exc}; choose another --port (or "
                         f"stop the program using it), and a --host that is an address of this machine") from None
    sock.set_inheritable(True)
    return sock


@path_flags("ckpt_dir", "tokenizer_path", "api_key", "model_name", "host")
def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    max_queue: int = 64,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    model_name: Optional[str] = None,
):
    """Serve a model over OpenAI's HTTP API.

    Args:
        ckpt_dir: checkpoint directory; default: the bundled demo model.
        host: the address to listen on; the default serves this machine only.
        port: the TCP port (0: any free one, printed at start).
        api_key: if set, every request must send `Authorization: Bearer KEY` (or set LLAMA_API_KEY).
        max_batch_size: requests decoded together (rows of the KV cache).
        max_seq_len: the longest prompt + answer, in tokens.
        max_queue: requests that may wait for a row; more get 503.
        max_request_bytes: the largest request body; larger ones get 413.
        model_name: the model's id in the API; default: the checkpoint folder's name.
    """
    for name, value, low in (("port", port, 0), ("max_request_bytes", max_request_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (name == "port" and value > 65535):
            limits = "from 0 to 65535" if name == "port" else ">= 1"
            raise LlamaError(f"--{name}={value!r} must be a whole number {limits}")
    api_key = api_key if api_key is not None else os.environ.get("LLAMA_API_KEY") or None
    from .demo import DEMO_NAME, ensure_demo

    generator = Llama.build(ckpt_dir=ckpt_dir if ckpt_dir is not None else str(ensure_demo()),
                            tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            model_parallel_size=model_parallel_size, dtype=dtype, quantize=quantize)
    if generator.ctx is not None and generator.ctx.data_parallel_size > 1:
        raise LlamaError(f"python -m llama.serve runs one copy of the model: --model_parallel_size "
                         f"({generator.ctx.model_parallel_size}) must equal the number of processes "
                         f"({generator.ctx.world_size}); start one server per copy behind a load balancer")
    service = EngineService(generator.engine, max_queue)
    with all_ranks_agree(f"opening the HTTP port {host}:{port}"):
        sock = bind(host, port) if is_main_rank() else None
    if sock is None:
        # The other ranks follow rank 0's engine loop; a Ctrl-C or torchrun's SIGTERM reaches rank 0
        # too, which ends the loop on every rank.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        service.run_loop()
        return
    name = model_name or (Path(ckpt_dir).name if ckpt_dir is not None else DEMO_NAME)
    app = OpenAIServer(generator, service, name).app(api_key, max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))

    def drive() -> None:
        try:
            service.run_loop()
        except BaseException:
            server.should_exit = True  # the error is in service.failed; main() raises it

    engine_thread = threading.Thread(target=drive, name="llama-engine")
    engine_thread.start()
    address = sock.getsockname()
    print(f"serving {name} on http://{host}:{address[1]}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr, flush=True)
    # uvicorn answers Ctrl-C and SIGTERM with a graceful shutdown, then raises the signal again
    # with the handlers it found: these, so that the engine loop is then stopped on every rank.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        engine_thread.join()
    if service.failed is not None:
        raise service.failed


if __name__ == "__main__":
    from .cli import run

    run(main)
