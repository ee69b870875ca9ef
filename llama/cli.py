"""Shared plumbing for the command-line scripts: user mistakes become one line on
stderr and exit status 1, never a traceback."""

import sys
from typing import Callable, Iterable

import fire
import torch
import torch.distributed as dist
from fire.decorators import SetParseFn

from .distributed import is_main_rank, leave_process_group
from .errors import LlamaError
from .generation import GenerationStats


def run(main: Callable) -> None:
    """fire.Fire(main), turning LlamaError (and a lost peer process) into a one-line error."""
    try:
        fire.Fire(main)
        leave_process_group()
    except LlamaError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        _fail(f"out of memory ({type(exc).__name__}: {exc}); lower --max_batch_size or --max_seq_len, "
              f"or run more model-parallel processes")
    except Exception as exc:
        if not _lost_peer(exc):
            leave_process_group()  # a bug: its traceback follows, without an abort at exit
            raise
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        _fail(f"lost contact with the other processes of this job ({first_line}); one of them "
              f"failed, was killed or is stuck (waits are bounded by LLAMA_DIST_TIMEOUT): its own "
              f"error, or torchrun's summary, names the cause")


def path_flags(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: fire passes these flags to the function as the text typed, never parsed
    (unmarked, fire turns `--ckpt_dir 2024` into the int 2024 and `--output 1e3` into 1000.0)."""
    return SetParseFn(str, *names)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr, flush=True)
    leave_process_group()
    sys.exit(1)


def _lost_peer(exc: Exception) -> bool:
    """A collective failed because another rank went away or timed out (gloo says so in a
    plain RuntimeError, NCCL in a DistBackendError)."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


def print_streamed(pieces: Iterable[str]) -> None:
    """Print text pieces as they arrive, then the separator Meta's examples print."""
    for piece in pieces:
        print(piece, end="", flush=True)
    print("\n\n==================================\n")


def print_timing(stats: GenerationStats) -> None:
    """The timing line after a generation, on stderr, from rank 0 only."""
    if is_main_rank():
        print(stats.summary(), file=sys.stderr, flush=True)
