"""Process groups, with or without torchrun: set-up (the backend from the device, fairscale's
model-parallel groups, seeding), bounded waits, agreements among ranks (all_ranks_agree),
values the main rank produces for all (FromMainRank), and leaving the group. The launcher's
environment and the main rank are llama.utils.ranks'; devices and dtypes llama.runtime.devices'."""

import atexit
import contextlib
import gc
import io
import os
import queue
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterator, List, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from .. import settings
from ..errors import LlamaError
from ..utils.ranks import is_main_rank, launch_env
from .devices import choose_device, device_identity

T = TypeVar("T")


def timeout_s() -> float:
    """The bound on every wait between ranks: LLAMA_DIST_TIMEOUT seconds (llama.settings)."""
    return settings.get("LLAMA_DIST_TIMEOUT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands. The world is data_parallel_size replicas of the model, each a
    model-parallel group of model_parallel_size consecutive ranks (fairscale's layout): replica
    rank // model_parallel_size, holding slice rank % model_parallel_size of every weight."""
    rank: int
    world_size: int
    local_rank: int
    model_parallel_size: int
    model_parallel_rank: int
    device: torch.device
    backend: str
    data_parallel_size: int = 1
    data_parallel_rank: int = 0


def check_own_devices(store: dist.Store, rank: int, world_size: int, device: torch.device) -> None:
    """LlamaError on every rank unless each rank has an accelerator of its own. Runs over the
    rendezvous store before the process group exists: NCCL would otherwise fail at its first
    collective ("Duplicate GPU detected"), which surfaces as a lost rank."""
    store.set(f"llama/device/{rank}", f"{device}|{device_identity(device) or ''}")
    holders: Dict[str, List[str]] = {}
    for other in range(world_size):
        name, _, identity = store.get(f"llama/device/{other}").decode().partition("|")
        if identity:
            holders.setdefault(identity, []).append(f"rank {other} ({name})")
    for identity, ranks in holders.items():
        if len(ranks) > 1:
            raise LlamaError(f"{' and '.join(ranks)} would run on one device ({identity}): each process "
                             f"needs a device of its own; start at most one process per device (torchrun "
                             f"--nproc_per_node N for N devices), and do not name one device (device="
                             f"'{device.type}:0') for several processes")


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
    this sets up a world of one by itself. Safe to call more than once. With an
    accelerator's own backend (NCCL) the group is bound to this rank's device and every
    group's communicators are made here, before the weights take the device's memory.
    """
    rank, world_size, local_rank = launch_env(announce=True)
    # launch_env checked LOCAL_WORLD_SIZE; a world of one ignores it as it ignores LOCAL_RANK
    local_world_size = (int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None) if world_size > 1 else None
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()

    chosen = choose_device(local_rank, world_size, device, local_world_size)
    backend = choose_backend(chosen)
    if chosen.type not in ("cpu", "mps"):
        torch.accelerator.set_device_index(chosen.index or 0)

    created = not dist.is_initialized()
    if created:
        timeout = timedelta(seconds=timeout_s())
        if "MASTER_ADDR" in os.environ and world_size > 1:
            store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            store.set_timeout(timeout)
            check_own_devices(store, rank, world_size, chosen)
        else:
            # A world of one needs no rendezvous: an in-memory store is enough.
            store, rank, world_size = dist.HashStore(), 0, 1
        # device_id binds the group to this rank's device: NCCL then sets up at once, here,
        # instead of in the first collective (the build's agreement, with the weights loaded).
        bound = {"device_id": chosen} if backend != "gloo" else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **bound)
        # Scripts that never leave the group (Meta's examples) still leave it before interpreter
        # shutdown: replicas finishing at different times otherwise abort at exit now and then.
        atexit.unregister(leave_process_group)  # once, however often a process re-joins
        atexit.register(leave_process_group)

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
    if created:
        _make_control_group(backend)
        if backend != "gloo":
            warm_up_groups(chosen)

    # The same seed everywhere, so every rank samples the same tokens.
    torch.manual_seed(seed)
    return DistContext(rank, world_size, local_rank, mp, fs_init.get_model_parallel_rank(), chosen, backend,
                       fs_init.get_data_parallel_world_size(), fs_init.get_data_parallel_rank())


def warm_up_groups(device: torch.device) -> None:
    """One tiny all-reduce on `device` over the world and over the model-parallel group: a
    backend that sets up lazily (NCCL, for groups not bound eagerly by older torch) makes
    its communicators now, while the device's memory is free and the KV cache not yet sized,
    and fails here, at start, if it cannot."""
    for group in (dist.group.WORLD, fs_init.get_model_parallel_group()):
        dist.all_reduce(torch.zeros(1, device=device), group=group)


# The group that agreements run over: gloo (on the CPU) even where the model's collectives
# use NCCL, so that they need no device memory (an agreement on a rank out of memory still
# happens) and a timed-out wait raises a Python exception that names the cause, where NCCL's
# watchdog would end the process without one.
_control: Dict[str, dist.ProcessGroup] = {}


def _make_control_group(backend: str) -> None:
    """Every rank calls this once, after init_process_group (new_group is collective)."""
    group = dist.group.WORLD if backend == "gloo" else dist.new_group(
        backend="gloo", timeout=timedelta(seconds=timeout_s()))
    _control["group"], _control["world"] = group, dist.group.WORLD


def control_group() -> dist.ProcessGroup:
    """The gloo group of the current process group (see _control)."""
    if _control.get("world") is not dist.group.WORLD:  # a process group made elsewhere, or anew
        _make_control_group(dist.get_backend())
    return _control["group"]


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
def all_ranks_agree(what: str, work_s: float = 0.0) -> Iterator[None]:
    """Run the block on every rank, then agree: if it raised on any rank, it raises on
    every rank, the others getting a LlamaError with the first failing rank's message.

    So a failure that only one rank sees (its own bad copy of a shard, its GPU out of
    memory) ends every rank at once, with the root cause on rank 0's stderr, instead of
    leaving the healthy ranks waiting in their next collective. The ranks that finish first
    wait for the others up to LLAMA_DIST_TIMEOUT plus `work_s`, the longest the block may
    legitimately take on a slow rank; a rank still missing then is named in a LlamaError.
    A no-op in a world of one.
    """
    error: Optional[Exception] = None
    try:
        yield
    except Exception as exc:
        error = exc
        _release(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = control_group()
        wait_s = timeout_s() + work_s
        try:
            dist.monitored_barrier(group, timeout=timedelta(seconds=wait_s), wait_all_ranks=True)
        except RuntimeError as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise LlamaError(f"not every rank finished {what} within {wait_s:.0f} s (LLAMA_DIST_TIMEOUT plus "
                             f"the time the work may take): {first_line}") from None
        reports = [None] * dist.get_world_size()
        mine = None
        if error is not None:
            mine = str(error) if isinstance(error, LlamaError) else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, mine, group=group)
        failed = [(rank, msg) for rank, msg in enumerate(reports) if msg is not None]
        if failed and error is None:
            rank, msg = failed[0]
            raise LlamaError(f"rank {rank} failed while {what}: {msg}")
    if error is not None:
        raise error


def smallest_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (a choice they must share); `value` in a world of one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return min(values)


def _release(error: BaseException) -> None:
    """Free what the failed block still holds through the error's traceback (its frames'
    locals: say, the weights loaded so far onto the device), and hand the freed memory back
    to the device, before the rank goes on to agree and to report."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    empty_device_cache()


def empty_device_cache() -> None:
    """Hand the memory the accelerator's allocator keeps but does not use back to the device
    (a no-op on a CPU-only machine)."""
    if torch.accelerator.is_available():
        accel = torch.accelerator.current_accelerator()
        empty_cache = getattr(torch.accelerator, "empty_cache", None) or getattr(
            getattr(torch, accel.type, None), "empty_cache", None)
        if empty_cache is not None:
            empty_cache()


class FromMainRank:
    """Values the main rank produces (a line typed in the terminal, a batch job's work list)
    handed to every rank. The main rank produces in a thread and meanwhile tells the others
    "still working" every few seconds, so no wait of theirs outlasts LLAMA_DIST_TIMEOUT
    however long the work takes (a user who types slowly, a large input to tokenize), while a
    rank that dies or hangs still ends the job within that bound. In a world of one, get()
    is produce() itself."""

    WORKING, DONE, FAILED, INTERRUPTED = range(4)

    def __init__(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        timeout = timeout_s()
        self.tick_s = min(10.0, timeout / 4)  # well inside every wait's bound
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if world > 1 else None

    def get(self, produce: Callable[[], T], what: str) -> T:
        """produce() from the main rank, on every rank. If it raises there, it raises there
        and the other ranks raise a LlamaError with its message (KeyboardInterrupt: every
        rank raises KeyboardInterrupt)."""
        if self.group is None:
            return produce()
        if not is_main_rank():
            while True:
                kind, value = self._share(None)
                if kind == self.DONE:
                    return value
                if kind == self.INTERRUPTED:
                    raise KeyboardInterrupt
                if kind == self.FAILED:
                    raise LlamaError(f"rank 0 failed while {what}: {value}")
        outcome: "queue.Queue[tuple]" = queue.Queue()
        threading.Thread(target=_produce_into, args=(produce, outcome), daemon=True).start()
        while True:
            try:
                value, error = outcome.get(timeout=self.tick_s)
            except queue.Empty:
                self._share((self.WORKING, None))
                continue
            except KeyboardInterrupt:
                self._share((self.INTERRUPTED, None))
                raise
            if error is None:
                self._share((self.DONE, value))
                return value
            self._share((self.INTERRUPTED, None) if isinstance(error, KeyboardInterrupt) else
                        (self.FAILED, str(error) if isinstance(error, LlamaError) else f"{type(error).__name__}: {error}"))
            raise error

    def _share(self, item):
        shared = [item]
        dist.broadcast_object_list(shared, src=0, group=self.group)
        return shared[0]


def _produce_into(produce: Callable[[], T], outcome: "queue.Queue[tuple]") -> None:
    try:
        outcome.put((produce(), None))
    except BaseException as exc:  # handed to the main thread, which raises it
        outcome.put((None, exc))


def leave_process_group() -> None:
    """Destroy fairscale's groups and the process group, if any. At a normal exit too: a
    group left to interpreter shutdown makes torch warn on every NCCL run and, with peers
    exiting at the same time, may abort the process ("terminate called without an active
    exception"). A later init_distributed starts afresh."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    _control.clear()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
