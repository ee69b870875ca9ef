"""Choices made by measuring on this machine, kept on disk so that every process here makes
the same one: the matmul kernel per weight shape (llama.native.kernel_choice), the decode
backend and a prompt's attention dtype (llama.runtime.backend). One mechanism for all.

A verdict is kept in a JSON file under $LLAMA_CACHE/tune/ under the hash of its key: a dict
of what it depends on, the machine's fields (machine_fields()) among them, so a file shared
between machines (a home folder on NFS) never hands one machine another's choice. Writers
hold the file's lock (llama.utils.locking, beside the file) and replace it atomically;
readers need no lock. One process measures at a time: the ranks of a job that start
together read the first one's verdicts instead of timing beside it, and all choose alike.
"""

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .. import settings
from .cpu import cpu_flags, cpu_model
from .locking import hold
from .ranks import is_main_rank


def verdict_file(name: str) -> Path:
    """The file that keeps the verdicts of one kind (e.g. "kernels")."""
    return settings.get("LLAMA_CACHE") / "tune" / f"{name}.json"


def machine_fields() -> Dict[str, object]:
    """The fields of every verdict's key that name the machine and software."""
    return {"cpu": cpu_model(), "flags": " ".join(cpu_flags()), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _entries(path: Path) -> Dict[str, dict]:
    try:
        return json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: measured again
        return {}


def _write(path: Path, new: Dict[str, dict]) -> None:
    """Merge `new` into the file (the caller holds its lock), replacing it atomically. The file
    is a cache: when it cannot be written (a full disk, a quota), the job goes on with the new
    verdicts in memory, and says once that they will be measured again next time."""
    entries = {**_entries(path), **new}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if path not in _UNWRITABLE:
            _UNWRITABLE.add(path)
            print(f"note: cannot keep measurements in {str(path)!r} ({exc.strerror or exc}); this run uses them, "
                  f"the next one measures again", file=sys.stderr, flush=True)


_UNWRITABLE: set = set()  # verdict files this process could not write (said once each)
_FIRST_USE_SPANS: List[Tuple[float, float]] = []  # (start, end) of each piece of first-use work here
_FIRST_USE_DEPTH = [0]


@contextlib.contextmanager
def first_use_work():
    """Marks one-time work of this process (a measurement kept on disk, the native build, or
    waiting for another process doing it) so that a generation's timing figures leave it out."""
    _FIRST_USE_DEPTH[0] += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _FIRST_USE_DEPTH[0] -= 1
        if not _FIRST_USE_DEPTH[0]:  # the outermost span only: a build inside a measurement counts once
            _FIRST_USE_SPANS.append((start, time.perf_counter()))


def first_use_seconds(start: float, end: Optional[float] = None) -> float:
    """Seconds of first-use work between two time.perf_counter() moments (end: now)."""
    end = time.perf_counter() if end is None else end
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in _FIRST_USE_SPANS)


def lookup(path: Path, key: dict) -> Optional[dict]:
    """The verdict kept for `key`, or None (nothing is measured)."""
    return _entries(path).get(_name(key))


def kept(path: Path, keys: Dict[Hashable, dict], measure: Callable[[Hashable], dict], what: str,
         again: bool = False) -> Dict[Hashable, dict]:
    """For each item of `keys` (item -> the key its verdict depends on), the verdict kept in
    `path`: measure(item) -> the verdict's fields for those not kept yet (all of them with
    `again`), then kept. Each verdict holds its key too. No collective may run inside
    measure(): a rank waiting on the lock would stall the one holding it."""
    names = {item: (_name(key), key) for item, key in keys.items()}
    entries = _entries(path)
    if again or any(name not in entries for name, _ in names.values()):
        with first_use_work(), hold(path, what, quiet=True):
            entries = _entries(path)
            todo = [(item, name, key) for item, (name, key) in names.items() if again or name not in entries]
            if todo:
                start = time.perf_counter()
                # First use on this machine: say what the wait is (the result is kept).
                if is_main_rank():
                    print(f"llama: first use here: {what} ({len(todo)} case{'s' * (len(todo) > 1)}, kept in "
                          f"{path})...", file=sys.stderr, flush=True)
                new = {name: {"key": key, **measure(item)} for item, name, key in todo}
                _write(path, new)
                entries.update(new)
                took = time.perf_counter() - start
                if is_main_rank() and took >= 1:
                    print(f"llama: {what} took {took:.0f} s", file=sys.stderr, flush=True)
    return {item: entries[name] for item, (name, _) in names.items()}


def stable_times(measure: Callable[[], Dict[str, float]], max_rounds: int) -> Tuple[Dict[str, float], int]:
    """Each candidate's best time over rounds of measure() -> {candidate: time}, taken until two
    rounds in a row name the same winner (at most max_rounds): a moment of load on a shared
    machine does not decide a verdict that is kept for good. Returns (best times, rounds)."""
    best: Dict[str, float] = {}
    winners: List[str] = []
    while len(winners) < max_rounds and (len(winners) < 2 or winners[-1] != winners[-2]):
        times = measure()
        winners.append(min(times, key=times.get))
        best = {name: min(t, best.get(name, t)) for name, t in times.items()}
    return best, len(winners)


def best_time(calls: Sequence[Callable[[], object]], reps: int) -> float:
    """Seconds of one uninterrupted call: each rep runs every call once (one per weight
    copy, so no copy is still cached when it comes round again); the fastest rep counts,
    not the median: on a shared machine a rep that waits for a preempted thread measures
    the neighbours, not the code."""
    for call in calls[:2]:
        call()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best
