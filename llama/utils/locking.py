"""Lock files between processes, for everything the engine writes where another process may
write too: the download cache, converted checkpoints, the native build, measured verdicts, a
batch job's output (held by its main rank for the job's lifetime; the job's own writers then
take turns on each append with a lock on the output file itself, llama.batch.ResultWriter).

Each lock is a hidden `.NAME.lock` file beside what it guards, held with the OS's file
lock (flock, through the `filelock` package): a process that dies, even by kill -9, lets
go of it, so a lock can never be left stale. The lock files themselves stay (removing
them safely is not possible while another process may be opening them); they are empty
and harmless to delete when nothing runs.
"""

import contextlib
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

from filelock import FileLock, Timeout

from ..errors import LlamaError

# One FileLock per lock file in this process, so holding a lock again from inside a block
# that holds it (e.g. the demo set-up calling the converter) nests instead of deadlocking.
_LOCKS: Dict[str, FileLock] = {}


def lock_path(target: Path) -> Path:
    """The lock file that guards `target`: `.NAME.lock` beside it."""
    return target.parent / f".{target.name}.lock"


def _lock_for(target: Path) -> FileLock:
    path = os.path.abspath(lock_path(target))
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(path)
    return _LOCKS[path]


def _acquire(lock: FileLock, timeout: float) -> None:
    try:
        Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=timeout)
    except Timeout:
        raise  # held by another process (filelock's Timeout is itself an OSError)
    except OSError as exc:
        raise LlamaError(f"cannot create the lock file {lock.lock_file!r} ({exc.strerror or exc}); "
                         f"the folder must be writable") from None


@contextlib.contextmanager
def hold(target: Path, what: str, quiet: bool = False) -> Iterator[None]:
    """Hold `target`'s lock for the block. If another process holds it, say so (unless quiet)
    and wait for it: that process is writing `what`, which the caller then finds ready."""
    lock = _lock_for(Path(target))
    try:
        _acquire(lock, timeout=0)
    except Timeout:
        if not quiet:
            print(f"waiting for another process that is preparing {what} ...", file=sys.stderr, flush=True)
        _acquire(lock, timeout=-1)
    try:
        yield
    finally:
        lock.release()


def try_hold(target: Path) -> Optional[FileLock]:
    """`target`'s lock, acquired, or None if another process holds it. Release it when done."""
    lock = _lock_for(Path(target))
    try:
        _acquire(lock, timeout=0)
    except Timeout:
        return None
    return lock
