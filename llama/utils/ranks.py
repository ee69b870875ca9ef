"""Which process this is among those a launcher (torchrun) started: the launcher's
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), checked, and the main rank,
the one that talks to the user. Below everything else, so any module may print from the
main rank only; the process groups themselves are llama.runtime.distributed's."""

import os
import sys
from typing import Tuple

import torch.distributed as dist

from ..errors import LlamaError


def launch_env(announce: bool = False) -> Tuple[int, int, int]:
    """(rank, world size, local rank) that the launcher (torchrun) put in the environment:
    RANK, WORLD_SIZE, LOCAL_RANK (defaults 0, 1, 0), checked against each other.

    A world of one is rank 0's whatever RANK and LOCAL_RANK say (so its output is never
    silenced); with `announce`, ignored values are named on stderr. Anything else that
    cannot be (not whole numbers, RANK outside the world, a world of several processes
    without torchrun's MASTER_ADDR/MASTER_PORT) is a LlamaError: never silence, never a hang."""
    env = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    numbers = {}
    for name, text in env.items():
        if text is not None and not text.strip().isdigit():
            raise LlamaError(f"environment variable {name}={text!r} must be a whole number >= 0; unset it "
                             f"(plain python runs one process) or start the job with torchrun")
        numbers[name] = None if text is None else int(text)
    world_size = 1 if numbers["WORLD_SIZE"] is None else numbers["WORLD_SIZE"]
    rank, local_rank, local_world = numbers["RANK"] or 0, numbers["LOCAL_RANK"] or 0, numbers["LOCAL_WORLD_SIZE"]
    fix = "unset RANK, WORLD_SIZE and LOCAL_RANK for one process, or start the job with torchrun"
    if world_size < 1:
        raise LlamaError(f"WORLD_SIZE={world_size} must be at least 1; {fix}")
    if world_size == 1:
        ignored = [f"{n}={env[n]}" for n in ("RANK", "LOCAL_RANK") if numbers[n]]
        if ignored and announce:
            print(f"note: ignoring {' '.join(ignored)}: a world of one process (WORLD_SIZE=1) is rank 0",
                  file=sys.stderr, flush=True)
        return 0, 1, 0
    if rank >= world_size:
        raise LlamaError(f"RANK={rank} is outside a world of WORLD_SIZE={world_size} processes (ranks 0 to "
                         f"{world_size - 1}); {fix}")
    if local_rank > rank or (local_world is not None and not local_rank < local_world <= world_size):
        raise LlamaError(f"LOCAL_RANK={local_rank} does not fit RANK={rank}, WORLD_SIZE={world_size}"
                         f"{'' if local_world is None else f', LOCAL_WORLD_SIZE={local_world}'} (a process's "
                         f"rank on its machine is below its machine's process count and at most its "
                         f"global rank); {fix}")
    if not dist.is_initialized():
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise LlamaError(f"WORLD_SIZE={world_size} says this is one of {world_size} processes, but "
                             f"{' and '.join(missing)} (where they meet) {'is' if len(missing) == 1 else 'are'} not set; {fix}")
    return rank, world_size, local_rank


def is_main_rank() -> bool:
    """True in the process that talks to the user: global rank 0 of the process group, or,
    before the group is joined, the one torchrun started as RANK 0 (every plain process)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return launch_env()[0] == 0
    except LlamaError:  # init_distributed will say what is wrong; until then, speak
        return True


def silence_non_main_ranks() -> None:
    """Only the main rank prints; other ranks keep stderr for their errors."""
    if not is_main_rank() and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")


def print0(*args, **kwargs) -> None:
    """print() on the main rank only."""
    if is_main_rank():
        print(*args, **kwargs)
