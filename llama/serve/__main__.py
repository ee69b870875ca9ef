"""The server's process: the model (every rank), the listening socket (rank 0), the engine
loop's thread, and the signals that stop it all (see llama.serve)."""

import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from .. import settings
from ..checkpoint.demo import DEMO_NAME
from ..cli import ModelFlags, path_flags, run, with_model_flags
from ..errors import LlamaError
from ..runtime.distributed import all_ranks_agree
from ..utils.checks import whole_number
from ..utils.ranks import is_main_rank
from .protocol import DEFAULT_MAX_REQUEST_BYTES
from .service import EngineService

try:  # the `serve` extra: pip install -e .[serve]
    import uvicorn

    from .app import OpenAIServer
except ImportError as _missing:  # one line that says what to do, as every CLI's errors
    sys.exit(f"error: python -m llama.serve needs the HTTP stack ({_missing.name} is not installed); install it "
             f"with: pip install -e '.[serve]'")
except LlamaError as _missing:  # llama.serve.app names what is missing
    sys.exit(f"error: {_missing}")


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
):
    """Serve a model over OpenAI's HTTP API.

    Args:
        host: the address to listen on; the default serves this machine only.
        port: the TCP port (0: any free one, printed at start).
        api_key: if set, every request must send `Authorization: Bearer KEY` (or set LLAMA_API_KEY).
        max_queue: requests that may wait for a row; more get 503.
        max_request_bytes: the largest request body; larger ones get 413.
        model_name: the model's id in the API; default: the checkpoint folder's name.
    """
    whole_number(port, "--port", low=0, high=65535)
    whole_number(max_request_bytes, "--max_request_bytes", low=1)
    api_key = api_key if api_key is not None else settings.get("LLAMA_API_KEY")
    generator = model.build()
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
    name = model_name or (Path(model.ckpt_dir).name if model.ckpt_dir is not None else DEMO_NAME)
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
    run(main)
