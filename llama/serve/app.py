"""The HTTP side of the server: FastAPI routes over OpenAI's API, the guard in front of them
(API key, body size and deadline, request ids, counts), and the bridge between an HTTP
request and the engine loop (llama.serve.service). What a request means and what an answer
looks like are llama.serve.protocol's; the text of the tokens is the detokenizer's
(llama.detokenize), as everywhere in the engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events
with "stream": true), GET /v1/models and /v1/models/{id} (these need the API key when one is
set), GET /health and /metrics (open, for probes and scrapers). Errors come in OpenAI's shape;
every response carries an `x-request-id` header, which the server's log lines name too.
"""

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from ..detokenize import Detokenizer
from ..errors import LlamaError
from ..generation import Llama
from ..tool_calls import might_be_call, parse_tool_call
from .protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    CHAT,
    Choice,
    CompletionJob,
    Piece,
    RequestReader,
    TokenEntry,
    MAX_JSON_DEPTH,
    json_depth,
    too_deep,
    prompt_entries,
    usage,
)
from .service import EngineService, QueueFull, ShuttingDown, Update

try:  # the `serve` extra: pip install -e .[serve]
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from .metrics import CONTENT_TYPE, Metrics
except ImportError as _missing:  # pragma: no cover - the message says what to do
    raise LlamaError(f"python -m llama.serve needs the HTTP stack ({_missing.name} is not installed); install "
                     f"it with: pip install -e '.[serve]'") from None

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
OPEN_PATHS = ("/health", "/metrics")  # liveness probes and scrapers send no key


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def log(request_id: str, text: str) -> None:
    print(f"llama.serve [request {request_id}]: {text}", file=sys.stderr, flush=True)


# ---- limits on every request: the API key, the body's size and deadline -------------------------

class Guard:
    """ASGI middleware: gives each request an id (the `x-request-id` header of its answer) and
    counts its answer; 401 for a /v1 request without `Authorization: Bearer <api_key>` (when a
    key is set); 413 for a body over max_bytes; 408 for a body not received within
    body_timeout_s. The body is read here, so that one sent without Content-Length is limited
    too."""

    def __init__(self, app, api_key: Optional[str], max_bytes: int, body_timeout_s: float, metrics: Metrics):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes
        self.body_timeout_s, self.metrics = body_timeout_s, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        refused = self._refusal(scope)
        if refused is not None:
            return await error_response(refused)(scope, receive, send_with_id)
        deadline = time.monotonic() + self.body_timeout_s
        body, more = b"", True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                late = APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                     f"(--idle_timeout_s)", code="request_timeout")
                return await error_response(late)(scope, receive, send_with_id)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await error_response(self._too_large())(scope, receive, send_with_id)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send_with_id)

    def _refusal(self, scope) -> Optional[APIError]:
        """The error a request gets before its body is read, if any."""
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and \
                not self._authorized(headers.get(b"authorization", b"")):
            return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                 "with the key this server was started with (--api-key)", code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server takes ({self.max_bytes} bytes, "
                             f"--max_request_bytes); send a shorter prompt", code="request_too_large")

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())


# ---- a request in the engine ---------------------------------------------------------------

@dataclass
class Submission:
    """A queued choice and the queue its engine updates arrive in (on the event loop)."""
    service: EngineService
    ident: int
    updates: "asyncio.Queue[Update]"
    finished: bool = False

    def close(self) -> None:
        """Cancel the request unless it has finished: its row is freed before the next step."""
        if not self.finished:
            self.finished = True
            self.service.cancel(self.ident)


async def merged(streams: List[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The items of several async iterators as they come; an error in one ends all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for item in streams[0]:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
            await queue.put((end, None))
        except Exception as exc:
            await queue.put((None, exc))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is end:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServer:
    """The HTTP endpoints over a Llama and the EngineService that runs its engine."""

    def __init__(self, generator: Llama, service: EngineService, model_name: str):
        self.generator, self.service, self.model_name = generator, service, model_name
        self.tokenizer = generator.tokenizer
        params = generator.model.params
        self.reader = RequestReader(generator.tokenizer, generator.formatter, params.max_seq_len,
                                    params.vocab_size, model_name)
        self.metrics = Metrics(service.status)

    def app(self, api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
            body_timeout_s: float = 15.0):
        """The ASGI application."""
        app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(HTTPException, self._http_error)
        app.add_exception_handler(Exception, self._bug)
        return Guard(app, api_key, max_request_bytes, body_timeout_s, self.metrics)

    @staticmethod
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @staticmethod
    async def _http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape."""
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    @staticmethod
    async def _bug(request: HTTPRequest, exc: Exception) -> JSONResponse:
        """An error of ours, not the client's: 500 in OpenAI's shape (the traceback goes to stderr)."""
        request_id = request.state.request_id
        log(request_id, "".join(traceback.format_exception(exc)).rstrip())
        return error_response(APIError(500, f"{type(exc).__name__}: {exc} (a bug in llama: please report it "
                                            f"with request id {request_id})", "server_error"))

    # ---- endpoints -------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if self.service.stopping.is_set():
            return error_response(APIError(503, "the server is shutting down", "server_error"))
        return JSONResponse({"status": "ok", **self.service.status()})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    def _model_card(self) -> Dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "llama",
                "max_model_len": self.reader.max_seq_len}

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, model_id: str) -> JSONResponse:
        if model_id != self.model_name:
            raise APIError(404, f"model {model_id!r:.80} is not served here; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request, "/v1/chat/completions")
        return await self._respond(await asyncio.to_thread(self.reader.chat_job, body), request)

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request, "/v1/completions")
        return await self._respond(await asyncio.to_thread(self.reader.completion_job, body), request)

    async def _body(self, request: HTTPRequest, endpoint: str) -> Dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
        except RecursionError:  # nested deeper than the parser goes
            raise too_deep() from None
        if json_depth(body) > MAX_JSON_DEPTH:
            raise too_deep()
        return self.reader.check_body(body, endpoint)

    # ---- answers ------------------------------------------------------------------------------

    async def _respond(self, job: CompletionJob, request: HTTPRequest) -> Response:
        """The answer, streamed as chunks or whole, in the shape of the job's endpoint."""
        answer_id = f"{job.shape.id_prefix}-{request.state.request_id}"
        submissions = self._submit(job, request.state.request_id)
        streams = [self._pieces(job, choice, s) for choice, s in zip(job.choices, submissions)]
        if job.stream:
            return self._sse(self._chunks(job, answer_id, streams), submissions)
        results = await self._collect(streams, submissions, request)
        choices, generated, scores = [], 0, []
        for choice, pieces in zip(job.choices, results):
            entries = [t for p in pieces for t in p.tokens]
            generated += len(entries)
            scores.append(sum(t.logprob for t in entries) / len(entries) if entries else -math.inf)
            last = pieces[-1]
            choices.append({"index": choice.index, **job.shape.whole("".join(p.text for p in pieces),
                                                                      (last.prompt or []) + entries, job, choice,
                                                                      last.tool_calls),
                            "finish_reason": last.finish_reason})
        if job.keep:
            choices = best_choices(choices, scores, job.keep, job.candidates)
        return JSONResponse({"id": answer_id, "object": job.shape.whole_object, "created": job.created,
                             "model": self.model_name, "choices": choices, "usage": usage(job, generated)})

    def _submit(self, job: CompletionJob, request_id: str) -> List[Submission]:
        """Queue every choice of the job now, or none (503 when the server is full)."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in job.choices]

        def poster(updates: "asyncio.Queue[Update]"):
            def post(update: Update) -> None:  # called by the engine thread
                with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits
                    loop.call_soon_threadsafe(updates.put_nowait, update)
            return post

        try:
            idents = self.service.submit_all([(c.request, poster(q)) for c, q in zip(job.choices, queues)])
        except QueueFull as exc:
            raise APIError(503, str(exc), "server_error", code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc), "server_error", code="server_shutting_down") from None
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        return [Submission(self.service, ident, q) for ident, q in zip(idents, queues)]

    @staticmethod
    def _failure(update: Update) -> APIError:
        """The error a choice that ended with an error or was cancelled answers with."""
        if isinstance(update.error, ShuttingDown):
            return APIError(503, f"{update.error}: this answer was cut short; send the request again",
                            "server_error", code="server_shutting_down")
        error = update.error or LlamaError("the request was cancelled")
        message = str(error) if isinstance(error, LlamaError) else f"{type(error).__name__}: {error}"
        return APIError(500, f"generation failed: {message}", "server_error")

    async def _pieces(self, job: CompletionJob, choice: Choice, submission: Submission) -> AsyncIterator[Piece]:
        """A choice's text as it becomes final; its request is cancelled if this ends early (a
        client that went away) or a stop string ends the text."""
        text = Detokenizer(self.tokenizer, choice.context, job.stops)
        tokens: List[TokenEntry] = []  # not yet sent
        last_at = time.perf_counter()
        first = True
        held, holding = "", bool(job.tools)  # text held back while the answer may still be a tool call
        try:
            while True:
                update = await submission.updates.get()
                finished = update.finish_reason is not None
                if finished:
                    submission.finished = True
                if update.finish_reason in ("error", "cancelled"):
                    raise self._failure(update)
                if update.token is not None:
                    now = time.perf_counter()
                    (self.metrics.first_token if first else self.metrics.between_tokens).observe(now - last_at)
                    first, last_at = False, now
                    self.metrics.generated_tokens.inc()
                    tokens.append(self._entry(job, text, update.token, update.logprob, update.top))
                    text.add(update.token)
                if update.stop_token is not None and job.echo and job.logprobs:
                    # Scoring clients (lm-eval) read the position after the prompt even when the
                    # model's most likely token there ends the answer: it is reported, without text.
                    entry = self._entry(job, text, update.stop_token, update.logprob, update.top)
                    tokens.append(TokenEntry("", entry.logprob, entry.top))
                piece = text.finish() if finished else text.take()
                done = text.stopped or finished
                if holding:
                    held += piece
                    call = parse_tool_call(job.tool_prefix + held) if done else None
                    if call is not None and call["tool_name"] in job.tools:  # a call of an offered function
                        yield Piece("", tokens, "tool_calls", tool_calls=[call])
                        return
                    if not done and might_be_call(job.tool_prefix + held):
                        continue
                    # Not a call after all: the text goes out as the answer (a failed forced call
                    # with the start the prompt gave it, so that it reads whole).
                    piece, held, holding = (job.tool_prefix if done else "") + held, "", False
                if done:
                    prompt = None if update.prompt_logprobs is None else prompt_entries(
                        self.tokenizer, choice.request.prompt_tokens, update.prompt_logprobs, update.prompt_top)
                    yield Piece(piece, tokens, "stop" if text.stopped else update.finish_reason, prompt)
                    return
                if piece:
                    yield Piece(piece, tokens)
                    tokens = []
        finally:
            submission.close()

    def _entry(self, job: CompletionJob, text: Detokenizer, token: int, logprob: float, top) -> TokenEntry:
        """A generated token's logprob entry (its text only where logprobs are shown)."""
        if not job.logprobs:
            return TokenEntry("", logprob)  # counted for usage; no text needed

        def shown(t: int) -> Tuple[str, Optional[bytes]]:
            piece = text.text_of(t)
            return piece, self.tokenizer.token_bytes(t) if "\ufffd" in piece else None

        alternatives = None
        if top is not None:
            alternatives = []
            for alternative, alternative_logprob in top:
                piece, raw = shown(alternative)
                alternatives.append((piece, alternative_logprob, raw))
        own, raw = shown(token)
        return TokenEntry(own, logprob, alternatives, raw)

    async def _collect(self, streams: List[AsyncIterator[Piece]], submissions: List[Submission],
                       http: HTTPRequest) -> List[List[Piece]]:
        """Every piece of every choice of a non-streamed answer; cancelled if the client goes away."""
        async def gather(stream: AsyncIterator[Piece]) -> List[Piece]:
            async with contextlib.aclosing(stream):
                return [p async for p in stream]

        task = asyncio.ensure_future(asyncio.gather(*(gather(s) for s in streams)))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and await http.is_disconnected():
                    raise APIError(499, "the client closed the connection")
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, APIError):
                    await task
            for submission in submissions:
                submission.close()

    # ---- streams ------------------------------------------------------------------------------

    def _sse(self, chunks: AsyncIterator[Dict[str, Any]], submissions: List[Submission]) -> StreamingResponse:
        """Server-sent events: each chunk as a `data:` line, then `data: [DONE]`; an error that
        comes after the first chunk is sent as an event in OpenAI's error shape."""
        async def events() -> AsyncIterator[str]:
            try:
                async with contextlib.aclosing(chunks):
                    try:
                        async for chunk in chunks:
                            yield f"data: {json.dumps(chunk)}\n\n"
                    except APIError as exc:
                        yield f"data: {json.dumps(exc.body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for submission in submissions:
                    submission.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chunks(self, job: CompletionJob, answer_id: str,
                      streams: List[AsyncIterator[Piece]]) -> AsyncIterator[Dict[str, Any]]:
        """The stream of an answer, its choices' chunks as they come, in its endpoint's shape (a
        usage chunk last if asked)."""
        shape = job.shape

        def chunk(index: int, choice: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
            out = {"id": answer_id, "object": shape.chunk_object, "created": job.created, "model": self.model_name,
                   "choices": [{"index": index, **choice, "finish_reason": finish}]}
            return {**out, "usage": None} if job.include_usage else out

        async def one(choice: Choice, pieces: AsyncIterator[Piece]) -> AsyncIterator[Dict[str, Any]]:
            sent_chars = len(choice.prompt_text)
            async with contextlib.aclosing(pieces):
                opening = shape.opening(job, choice)
                if opening is not None:
                    yield chunk(choice.index, opening)
                async for piece in pieces:
                    if piece.tool_calls:
                        yield chunk(choice.index, {"delta": {"tool_calls": CHAT.calls(piece.tool_calls, delta=True)},
                                                   "logprobs": None})
                    if piece.text or piece.tokens:
                        yield chunk(choice.index, shape.delta(piece.text, piece.tokens, job, sent_chars))
                    sent_chars += len(piece.text)
                    if piece.finish_reason is not None:
                        yield chunk(choice.index, shape.closing(), piece.finish_reason)
                    yield len(piece.tokens)  # counted for usage, not sent

        generated = 0
        async for item in merged([one(c, s) for c, s in zip(job.choices, streams)]):
            if isinstance(item, int):
                generated += item
            else:
                yield item
        if job.include_usage:
            yield {"id": answer_id, "object": shape.chunk_object, "created": job.created, "model": self.model_name,
                   "choices": [], "usage": usage(job, generated)}


def best_choices(choices: List[Dict[str, Any]], scores: List[float], keep: int,
                 per_prompt: int) -> List[Dict[str, Any]]:
    """best_of: of each prompt's `per_prompt` consecutive choices, the `keep` with the highest
    mean token logprob (`scores`), best first (a tie: the earlier sample), numbered as n choices are."""
    kept = []
    for number in range(len(choices) // per_prompt):
        group = range(number * per_prompt, (number + 1) * per_prompt)
        for rank, i in enumerate(sorted(group, key=lambda i: -scores[i])[:keep]):
            kept.append({**choices[i], "index": number * keep + rank})
    return kept
