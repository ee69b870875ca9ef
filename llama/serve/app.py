"""The HTTP side of the server: FastAPI routes over OpenAI's API, the API-key and body-size
guard, and the bridge between an HTTP request and the engine loop (llama.serve.service).
What a request means and what an answer looks like are llama.serve.protocol's; the text of
the tokens is the detokenizer's (llama.detokenize), as everywhere in the engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events
with "stream": true), GET /v1/models, GET /health. Errors come in OpenAI's shape.
"""

import asyncio
import contextlib
import hmac
import json
import secrets
import traceback
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

from ..detokenize import Detokenizer
from ..errors import LlamaError
from ..generation import Llama
from .protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    CompletionJob,
    Piece,
    RequestReader,
    TokenEntry,
    prompt_entries,
    usage,
)
from .service import EngineService, QueueFull, Update

try:  # the `serve` extra: pip install -e .[serve]
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
except ImportError as _missing:  # pragma: no cover - the message says what to do
    raise LlamaError(f"python -m llama.serve needs the HTTP stack ({_missing.name} is not installed); install "
                     f"it with: pip install -e '.[serve]'") from None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


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
            refused = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                    "with the key this server was started with (--api-key)", code="invalid_api_key")
            return await error_response(refused)(scope, receive, send)
        too_large = error_response(APIError(413, f"the request body is larger than this server takes "
                                                 f"({self.max_bytes} bytes, --max_request_bytes); send a "
                                                 f"shorter prompt", code="request_too_large"))
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


# ---- a request in the engine ---------------------------------------------------------------

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
        params = generator.model.params
        self.reader = RequestReader(generator.tokenizer, generator.formatter, params.max_seq_len,
                                    params.vocab_size, model_name)

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
        return error_response(exc)

    @staticmethod
    async def _http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape."""
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    @staticmethod
    async def _bug(request: HTTPRequest, exc: Exception) -> JSONResponse:
        """An error of ours, not the client's: 500 in OpenAI's shape (the traceback goes to stderr)."""
        traceback.print_exception(exc)
        return error_response(APIError(500, f"{type(exc).__name__}: {exc} (a bug in llama: please report it)",
                                       "server_error"))

    # ---- endpoints -------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if self.service.stopping.is_set():
            return error_response(APIError(503, "the server is shutting down", "server_error"))
        return JSONResponse({"status": "ok", **self.service.status()})

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "llama",
            "max_model_len": self.reader.max_seq_len}]})

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._respond(self.reader.chat_job(await self._body(request)), request)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._respond(self.reader.completion_job(await self._body(request)), request)

    async def _body(self, request: HTTPRequest) -> Dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
        return self.reader.check_body(body)

    async def _respond(self, job: CompletionJob, request: HTTPRequest) -> Response:
        """The answer, streamed as chunks or whole, in the shape of the job's endpoint."""
        answer_id = f"{job.shape.id_prefix}-{secrets.token_hex(12)}"
        if job.stream:
            return self._sse(self._chunks(job, answer_id, self._submit(job)))
        pieces = await self._collect(job, request)
        text, entries = "".join(p.text for p in pieces), [t for p in pieces for t in p.tokens]
        last = pieces[-1]
        shown = entries if last.prompt_logprobs is None else \
            prompt_entries(self.tokenizer, job, last.prompt_logprobs) + entries
        return JSONResponse({
            "id": answer_id, "object": job.shape.whole_object, "created": job.created, "model": self.model_name,
            "choices": [{"index": 0, **job.shape.whole(text, shown, job), "finish_reason": last.finish_reason}],
            "usage": usage(job, len(entries))})

    # ---- the engine's tokens -> pieces of text ----------------------------------------------

    def _submit(self, job: CompletionJob) -> Submission:
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

    async def _pieces(self, job: CompletionJob, submission: Submission) -> AsyncIterator[Piece]:
        """The answer's text as it becomes final; the request is cancelled if this ends early
        (a client that went away) or a stop string ends the text."""
        text = Detokenizer(self.tokenizer, job.context, job.stops)
        tokens: List[TokenEntry] = []  # not yet sent
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
                    if job.logprobs:
                        top = None if update.top is None else [(text.text_of(a), lp) for a, lp in update.top]
                        tokens.append(TokenEntry(text.text_of(update.token), update.logprob, top))
                    else:  # counted for usage; no text needed
                        tokens.append(TokenEntry("", update.logprob))
                    text.add(update.token)
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

    async def _collect(self, job: CompletionJob, http: HTTPRequest) -> List[Piece]:
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

    # ---- streams ------------------------------------------------------------------------------

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

    async def _chunks(self, job: CompletionJob, answer_id: str,
                      submission: Submission) -> AsyncIterator[Dict[str, Any]]:
        """The stream of one answer, in its endpoint's shape (a usage chunk last if asked)."""
        shape = job.shape

        def chunk(choice: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
            out = {"id": answer_id, "object": shape.chunk_object, "created": job.created, "model": self.model_name,
                   "choices": [{"index": 0, **choice, "finish_reason": finish}]}
            return {**out, "usage": None} if job.include_usage else out

        sent_tokens, sent_chars = 0, len(job.prompt_text)
        async with submission.closing(self._pieces(job, submission)) as pieces:
            opening = shape.opening(job)
            if opening is not None:
                yield chunk(opening)
            async for piece in pieces:
                if piece.text or piece.tokens:
                    yield chunk(shape.delta(piece.text, piece.tokens, job, sent_chars))
                sent_tokens += len(piece.tokens)
                sent_chars += len(piece.text)
                if piece.finish_reason is not None:
                    yield chunk(shape.closing(), piece.finish_reason)
        if job.include_usage:
            yield {"id": answer_id, "object": shape.chunk_object, "created": job.created, "model": self.model_name,
                   "choices": [], "usage": usage(job, sent_tokens)}
