"""The server's process: the flags and the listening socket (rank 0, before the model
loads, so that a port in use or a bad flag is reported at once), the model (every rank), the
engine loop's thread, and the signals that stop it all (see llama.serve).

SIGTERM or Ctrl-C drains: the socket stops accepting, new requests get 503, running ones
may finish for --shutdown_grace_s seconds; then the rest end with an error in OpenAI's shape
(an error event and `data: [DONE]` in a stream) and the process exits 0."""

import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .. import settings
from ..checkpoint.demo import DEMO_NAME
from ..cli import ModelFlags, path_flags, run, with_model_flags
from ..errors import LlamaError
from ..utils.checks import real_number, whole_number
from ..utils.ranks import launch_env
from .protocol import DEFAULT_MAX_REQUEST_BYTES
from .service import EngineService

try:  # the `serve` extra: pip install -e .[serve]
    import uvicorn

    from .app import OpenAIServer
    from .connections import limited_protocol
except ImportError as _missing:  # one line that says what to do, as every CLI's errors
    sys.exit(f"error: python -m llama.serve needs the HTTP stack ({_missing.name} is not installed); install it "
             f"with: pip install -e '.[serve]'")
except LlamaError as _missing:  # llama.serve.app names what is missing
    sys.exit(f"error: {_missing}")

SPARE_DESCRIPTORS = 64  # for the model's files, logs and the engine, beyond the connections


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port), or a LlamaError that says
    why not. Made as a TCP socket by name, so that asyncio sets TCP_NODELAY on every accepted
    connection (Nagle's algorithm would hold each small write of a reused connection ~40 ms)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise LlamaError(f"cannot listen on --host {host} --port {port}: {exc}; choose another --port (or "
                         f"stop the program using it), and a --host that is an address of this machine") from None
    sock.set_inheritable(True)
    return sock


def connection_cap(asked: Optional[int]) -> int:
    """The most connections to keep open: --max_connections, within the open-file limit (raised to
    its hard maximum first), so that the process never fails to open a file for want of one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    room = soft - SPARE_DESCRIPTORS if soft != resource.RLIM_INFINITY else 1 << 20
    if asked is None:
        return max(1, min(1024, room))
    if asked > room:
        raise LlamaError(f"--max_connections={asked} is more than this process may open (its open-file limit is "
                         f"{soft}, {SPARE_DESCRIPTORS} kept spare); raise `ulimit -n` or ask for at most {room}")
    return asked


@with_model_flags(max_seq_len=2048, max_batch_size=8)
@path_flags("api_key", "model_name", "host")
def main(
    model: ModelFlags,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_queue: int = 64,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    model_name: Optional[str] = None,
    max_connections: Optional[int] = None,
    idle_timeout_s: float = 15.0,
    shutdown_grace_s: float = 5.0,
):
    """Serve a model over OpenAI's HTTP API.

    Args:
        host: the address to listen on; the default serves this machine only.
        port: the TCP port (0: any free one, printed at start).
        api_key: if set, every /v1 request must send `Authorization: Bearer KEY` (or set LLAMA_API_KEY).
        max_queue: requests that may wait for a row; more get 503.
        max_request_bytes: the largest request body; larger ones get 413.
        model_name: the model's id in the API; default: the checkpoint folder's name.
        max_connections: connections open at once; one more gets 503 (default: 1024, within `ulimit -n`).
        idle_timeout_s: a connection idle this long, or a request not fully sent within it, is closed.
        shutdown_grace_s: on SIGTERM or Ctrl-C, how long running requests may go on before they end with an error.
    """
    whole_number(port, "--port", low=0, high=65535)
    whole_number(max_request_bytes, "--max_request_bytes", low=1)
    whole_number(max_queue, "--max_queue", low=0)
    whole_number(max_connections, "--max_connections", low=1, optional=True)
    idle_timeout_s = real_number(idle_timeout_s, "--idle_timeout_s", low=0, above=True)
    shutdown_grace_s = real_number(shutdown_grace_s, "--shutdown_grace_s", low=0)
    api_key = settings.check_api_key(api_key, "--api-key") if api_key is not None else settings.get("LLAMA_API_KEY")
    sock, cap = None, 0
    if launch_env()[0] == 0:  # the one that serves HTTP; under torchrun a failure here ends the other ranks
        cap = connection_cap(max_connections)
        sock = bind(host, port)
    generator = model.build()
    if generator.ctx is not None and generator.ctx.data_parallel_size > 1:
        raise LlamaError(f"python -m llama.serve runs one copy of the model: --model_parallel_size "
                         f"({generator.ctx.model_parallel_size}) must equal the number of processes "
                         f"({generator.ctx.world_size}); start one server per copy behind a load balancer")
    service = EngineService(generator.engine, max_queue)
    if sock is None:
        # The other ranks follow rank 0's engine loop; a Ctrl-C or torchrun's SIGTERM reaches rank 0
        # too, which ends the loop on every rank.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        service.run_loop()
        return
    name = model_name or (Path(model.ckpt_dir).name if model.ckpt_dir is not None else DEMO_NAME)
    app = OpenAIServer(generator, service, name).app(api_key, max_request_bytes, idle_timeout_s)
    # uvicorn's graceful shutdown waits for open answers; ours end by the grace period, so its
    # wait is only a backstop.
    server = uvicorn.Server(uvicorn.Config(
        app, http=limited_protocol(cap, idle_timeout_s), ws="none", log_level="warning", access_log=False,
        lifespan="off", timeout_keep_alive=max(1, round(idle_timeout_s)),
        timeout_graceful_shutdown=int(shutdown_grace_s) + 10))

    def drive() -> None:
        try:
            service.run_loop()
        except BaseException:
            server.should_exit = True  # the error is in service.failed; main() raises it

    def drain() -> None:
        """Once uvicorn is asked to exit: refuse new requests, give running ones the grace
        period, then end the rest with an error."""
        while not server.should_exit:
            time.sleep(0.05)
        service.drain()
        deadline = time.monotonic() + shutdown_grace_s
        while service.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        service.stop()

    engine_thread = threading.Thread(target=drive, name="llama-engine")
    engine_thread.start()
    threading.Thread(target=drain, name="llama-drain", daemon=True).start()
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
    run(main)
