"""The engine behind the HTTP server: a request queue in front of llama.runtime.engine.Engine,
driven by one loop that every rank runs. No HTTP here (llama.serve.app is the HTTP layer).

The main rank's HTTP side calls submit() and cancel() from any thread; they only queue. The
loop (run_loop: an engine thread on the main rank, the main thread elsewhere) takes what was
queued, hands it to every rank, applies it to the engine in the same order on every rank and
steps the engine while requests are pending, so that under model parallelism all ranks run
the same forward passes. Each request's updates go to the callback it was submitted with, called
from the loop's thread (the HTTP side hands them to its event loop thread-safely).

While nothing is pending the main rank still sends an empty message every few seconds, so the
other ranks' waits stay bounded (LLAMA_DIST_TIMEOUT), as the chat REPL's do: a rank that dies
or hangs ends the server on the others instead of leaving them waiting forever.
"""

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch.distributed as dist

from ..errors import LlamaError
from ..runtime.distributed import control_group, timeout_s
from ..runtime.engine import Engine, EngineStats, Event, Handle, Request
from ..utils.checks import whole_number
from ..utils.ranks import is_main_rank


@dataclass
class Update:
    """What a request got from one engine step: a token (None when the step only finished it)
    with its logprob and most likely alternatives, and, on its last update, finish_reason
    ("stop", "length", "cancelled" or "error", with `error`), the stop token that ended it
    (then logprob and top are that token's) and the prompt's logprobs and alternatives (echo)."""
    token: Optional[int]
    logprob: float = 0.0
    top: Optional[List[Tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    prompt_logprobs: Optional[List[float]] = None
    prompt_top: Optional[List[List[Tuple[int, float]]]] = None
    stop_token: Optional[int] = None


@dataclass
class _Message:
    """What the main rank hands every rank before a step."""
    submits: List[Tuple[int, Request]] = field(default_factory=list)
    cancels: List[int] = field(default_factory=list)
    stop: bool = False


class QueueFull(LlamaError):
    """More requests outstanding than the server takes (max_batch_size running + max_queue waiting)."""


class ShuttingDown(LlamaError):
    """The server is stopping: no new requests, and what still runs at the end of the grace
    period ends with this error."""


class EngineService:
    """A request queue over `engine` (see the module docstring). max_queue: the most requests
    that may wait for a row on top of the max_batch_size running; submit() refuses more."""

    def __init__(self, engine: Engine, max_queue: int):
        max_queue = whole_number(max_queue, "--max_queue", low=0)
        self.engine = engine
        self.capacity = engine.params.max_batch_size + max_queue
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.tick_s = min(5.0, timeout_s() / 4)  # an idle main rank's heartbeat, well inside every wait
        self._inbox: "queue.Queue[Tuple[str, object]]" = queue.Queue()
        self._callbacks: Dict[int, Callable[[Update], None]] = {}  # main rank: request id -> its callback
        self._handles: Dict[int, Handle] = {}  # every rank: request id -> engine handle while it runs
        self._idents: Dict[int, int] = {}  # every rank: engine handle id -> request id, while it runs
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted, not finished (main rank)
        self.draining = False  # new requests refused (shutting down); running ones go on
        self.stopping = threading.Event()
        self.failed: Optional[BaseException] = None  # the error that ended the loop, if any

    # ---- the HTTP side (main rank, any thread) -------------------------------------------------

    def submit(self, request: Request, on_update: Callable[[Update], None]) -> int:
        """Queue a checked request; its id. QueueFull when the server is at capacity,
        ShuttingDown once it is draining or stopped."""
        return self.submit_all([(request, on_update)])[0]

    def submit_all(self, requests: List[Tuple[Request, Callable[[Update], None]]]) -> List[int]:
        """Queue several requests (the choices of one answer) together or none of them; their ids."""
        with self._lock:
            if self.draining or self.stopping.is_set() or self.failed is not None:
                raise ShuttingDown("the server is shutting down")
            if self._outstanding + len(requests) > self.capacity:
                raise QueueFull(f"the server is at capacity ({self.capacity} requests: --max_batch_size "
                                f"running plus --max_queue waiting; this answer needs {len(requests)}); "
                                f"retry later")
            self._outstanding += len(requests)
            idents = []
            for request, on_update in requests:
                ident = next(self._ids)
                self._callbacks[ident] = on_update
                idents.append(ident)
        for ident, (request, _) in zip(idents, requests):
            self._inbox.put(("submit", (ident, request)))
        return idents

    @property
    def outstanding(self) -> int:
        """Requests submitted and not finished."""
        return self._outstanding

    def drain(self) -> None:
        """Refuse new requests from now on; those submitted go on (stop() ends them)."""
        with self._lock:
            self.draining = True

    def cancel(self, ident: int) -> None:
        """Stop a request (its client went away, or a stop string ended it); its row is freed
        before the next step. A no-op for a finished request."""
        self._inbox.put(("cancel", ident))

    def stop(self) -> None:
        """End the loop on every rank after the current step."""
        self.stopping.set()
        self._inbox.put(("stop", None))

    def status(self) -> Dict[str, object]:
        """Counts for /health: requests running and waiting, the engine's counters."""
        stats: EngineStats = self.engine.stats
        return {"running": sum(h is not None for h in self.engine.rows), "waiting": len(self.engine.waiting),
                "outstanding": self._outstanding, "decode_steps": stats.decode_passes,
                "generated_tokens": stats.generated, "prefill_tokens": stats.prefill_tokens,
                "prefix_reused_tokens": stats.prefix_reused}

    # ---- the loop (every rank) ---------------------------------------------------------------

    def run_loop(self) -> None:
        """Step the engine until stop(); on every rank. Every rank gets the same messages and
        applies them in the same order, so all ranks step together."""
        main = is_main_rank()
        try:
            while True:
                message = self._collect() if main else None
                if self.world > 1:
                    shared = [message]
                    dist.broadcast_object_list(shared, src=0, group=control_group())
                    message = shared[0]
                if message.stop:
                    return
                self._apply(message, main)
                if not self.engine.idle:
                    self._step(main)
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            self.stopping.set()
            if main:
                self._fail_all(self.failed or ShuttingDown("the server is shutting down"))

    def _collect(self) -> _Message:
        """The main rank's next message: everything queued, waiting up to tick_s when idle."""
        message = _Message()
        block = self.engine.idle
        while True:
            try:
                kind, value = self._inbox.get(timeout=self.tick_s) if block else self._inbox.get_nowait()
            except queue.Empty:
                return message
            block = False
            if kind == "submit":
                message.submits.append(value)
            elif kind == "cancel":
                message.cancels.append(value)
            else:
                message.stop = True
                return message

    def _apply(self, message: _Message, main: bool) -> None:
        for ident, request in message.submits:
            try:
                handle = self.engine.submit(request, f"request {ident}")
            except LlamaError as exc:  # checked before it was queued; a bug if it fails here
                if main:
                    self._deliver(ident, Update(None, finish_reason="error", error=exc))
                continue
            self._handles[ident], self._idents[handle.id] = handle, ident
        for ident in message.cancels:
            handle = self._handles.pop(ident, None)
            if handle is None:
                continue  # finished already
            # The row is free now; the engine's own "cancelled" event (next step) is not needed.
            self.engine.cancel(handle)
            del self._idents[handle.id]
            if main:
                self._deliver(ident, Update(None, finish_reason="cancelled"))

    def _step(self, main: bool) -> None:
        try:
            events = self.engine.step()
        except Exception:
            if self.world > 1:
                raise  # the ranks may no longer agree on where they are: end the server
            # In a world of one the engine stays usable: the running requests end with the error.
            events = [Event(h, None, finish_reason="error") for h in self._handles.values() if h.done]
        for event in events:
            ident = self._idents.get(event.handle.id)
            if ident is None:
                continue  # cancelled by us, already reported
            handle = event.handle
            if event.finish_reason is not None:
                del self._handles[ident], self._idents[handle.id]
            if main:
                last = event.finish_reason is not None
                self._deliver(ident, Update(
                    event.token, event.logprob, event.top, event.finish_reason, handle.error,
                    handle.prompt_logprobs if last else None, handle.prompt_top_logprobs if last else None,
                    event.stop_token))

    def _deliver(self, ident: int, update: Update) -> None:
        if update.finish_reason is not None:
            with self._lock:
                callback = self._callbacks.pop(ident, None)
                self._outstanding -= callback is not None
        else:
            callback = self._callbacks.get(ident)
        if callback is not None:
            callback(update)

    def _fail_all(self, error: BaseException) -> None:
        """Every request still outstanding ends with `error` (the loop has stopped)."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, {}
            self._outstanding = 0
        for callback in callbacks.values():
            callback(Update(None, finish_reason="error", error=error))
