"""Device and backend choice, process-group set-up with or without torchrun, seeding,
and rank-0-only printing. Everything that knows about ranks and hardware lives here."""

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from .errors import LlamaError

# Bounded so that a rank that hangs ends the job instead of leaving the others waiting
# forever. (A rank that dies or fails ends the job at once: see all_ranks_agree.)
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 7 * 24 * 3600


def timeout_s() -> float:
    """The process-group timeout: LLAMA_DIST_TIMEOUT seconds, default 300, at most a week
    (the point is a bounded wait; inf or nan would not be one)."""
    text = os.environ.get("LLAMA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT_S:
        raise LlamaError(f"LLAMA_DIST_TIMEOUT={text!r} must be a positive number of seconds, at most "
                         f"{MAX_TIMEOUT_S} (a week)")
    return value


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    model_parallel_size: int
    model_parallel_rank: int
    device: torch.device
    backend: str


def choose_device(local_rank: int, world_size: int,
                  requested: Union[str, torch.device, None] = None) -> torch.device:
    """The accelerator for this local rank if there is one, else MPS (one process only), else CPU."""
    if requested is not None:
        return _requested_device(requested, local_rank)
    if torch.accelerator.is_available():
        accel = torch.accelerator.current_accelerator()
        if accel is not None and accel.type != "mps":
            return torch.device(accel.type, local_rank % torch.accelerator.device_count())
        if accel is not None and world_size == 1:
            return torch.device("mps")
    return torch.device("cpu")


def _requested_device(requested: Union[str, torch.device], local_rank: int) -> torch.device:
    """torch.device(requested), checked to exist on this machine; an accelerator named
    without an index is this local rank's."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise LlamaError(f"device={requested!r} is not a device; use e.g. 'cpu', 'cuda', 'cuda:1' or "
                         f"'mps', or leave it out to choose automatically") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    if module is None or not getattr(module, "is_available", lambda: False)():
        raise LlamaError(f"device={requested!r}: this machine (or this build of torch) has no "
                         f"{device.type} device; use device='cpu', or leave it out to choose automatically")
    if device.index is None and device.type != "mps":
        device = torch.device(device.type, local_rank)
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise LlamaError(f"device={requested!r}: there is no {device.type} device {device.index} here "
                         f"(this machine has {count}); name one from 0 to {count - 1}")
    return device


def choose_backend(device: torch.device) -> str:
    """NCCL (or the accelerator's own backend) only where it exists; gloo everywhere else."""
    backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        return "gloo"
    return backend


def init_distributed(model_parallel_size: Optional[int] = None,
                     device: Union[str, torch.device, None] = None,
                     seed: int = 1) -> DistContext:
    """Join (or create) the process group and fairscale's model-parallel groups.

    Under torchrun the environment names rank and world; as plain `python script.py`
    this sets up a world of one by itself. Safe to call more than once.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()

    chosen = choose_device(local_rank, world_size, device)
    backend = choose_backend(chosen)
    if chosen.type not in ("cpu", "mps"):
        torch.accelerator.set_device_index(chosen.index or 0)

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s())
        if "MASTER_ADDR" in os.environ and world_size > 1:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # A world of one needs no rendezvous: an in-memory store is enough.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)

    mp = world_size if model_parallel_size is None else model_parallel_size
    if mp < 1 or world_size % mp != 0:
        raise LlamaError(f"model_parallel_size={mp} must be a positive divisor of the world size "
                         f"{world_size} (the number of processes torchrun started)")
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale announces its groups
            fs_init.initialize_model_parallel(mp)
        _bound_fairscale_timeouts(timedelta(seconds=timeout_s()))
    elif fs_init.get_model_parallel_world_size() != mp:
        raise LlamaError(f"model parallelism is already set up with size "
                         f"{fs_init.get_model_parallel_world_size()}; cannot switch to {mp} "
                         f"in the same process")

    # The same seed everywhere, so every rank samples the same tokens.
    torch.manual_seed(seed)
    return DistContext(rank, world_size, local_rank, mp, fs_init.get_model_parallel_rank(), chosen, backend)


def _bound_fairscale_timeouts(timeout: timedelta) -> None:
    """fairscale makes its groups with torch's default timeout (30 min for gloo, 10 for
    NCCL), which the collectives of every forward pass use; give them ours."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3
    if set_timeout is None:
        return
    groups = (fs_init.get_model_parallel_group(), fs_init.get_data_parallel_group(),
              fs_init.get_pipeline_parallel_group())
    for group in set(groups):
        set_timeout(timeout, group)


@contextlib.contextmanager
def all_ranks_agree(what: str) -> Iterator[None]:
    """Run the block on every rank, then agree: if it raised on any rank, it raises on
    every rank, the others getting a LlamaError with the first failing rank's message.

    So a failure that only one rank sees (its own bad copy of a shard, its GPU out of
    memory) ends every rank at once, with the root cause on rank 0's stderr, instead of
    leaving the healthy ranks waiting in their next collective. A no-op in a world of one.
    """
    error: Optional[Exception] = None
    try:
        yield
    except Exception as exc:
        error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        mine = None
        if error is not None:
            mine = str(error) if isinstance(error, LlamaError) else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, mine)
        failed = [(rank, msg) for rank, msg in enumerate(reports) if msg is not None]
        if failed and error is None:
            rank, msg = failed[0]
            raise LlamaError(f"rank {rank} failed while {what}: {msg}")
    if error is not None:
        raise error


def is_main_rank() -> bool:
    """True in the process that talks to the user: global rank 0 of the process group, or,
    before the group is joined, the one torchrun started as RANK 0 (every plain process)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", "0")
    return not rank.isdigit() or int(rank) == 0


def silence_non_main_ranks() -> None:
    """Only the main rank prints; other ranks keep stderr for their errors."""
    if not is_main_rank() and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")


def print0(*args, **kwargs) -> None:
    """print() on the main rank only."""
    if is_main_rank():
        print(*args, **kwargs)
