"""Which pages of a memory-mapped checkpoint shard this process reads and keeps resident.

Left to page faults, the kernel reads ahead several MB past each touched page (read_ahead_kb,
8 MB on this machine), so a rank that keeps half of a weight would read the other half too;
and pages it has copied would stay in its resident memory until the whole shard is closed.
These hints (madvise) avoid both. Linux only (elsewhere they do nothing), and only for
tensors memory-mapped from a file by torch.load(mmap=True): on anonymous memory
MADV_DONTNEED would zero the data.
"""

import ctypes
import mmap
import sys
from typing import Callable, Optional

import torch

_RANDOM, _WILLNEED, _DONTNEED = 1, 3, 4  # MADV_* on Linux
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Optional[Callable[[int, int, int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def read_only_what_is_used(source: torch.Tensor, used: torch.Tensor) -> None:
    """Of the mapped tensor `source`, read exactly the pages under `used` (a view of it), in
    large reads now, and nothing around them on later page faults."""
    storage = source.untyped_storage()
    _madvise(storage.data_ptr(), storage.nbytes(), _RANDOM, whole_pages_only=False)
    extent = (sum((n - 1) * step for n, step in zip(used.shape, used.stride())) + 1) * used.element_size()
    _madvise(used.data_ptr(), extent, _WILLNEED, whole_pages_only=False)


def release(source: torch.Tensor) -> None:
    """Drop the pages of the mapped tensor `source` from this process (once copied, they
    only add to its resident memory); touched again, they are read back from the file."""
    storage = source.untyped_storage()
    _madvise(storage.data_ptr(), storage.nbytes(), _DONTNEED, whole_pages_only=True)


def _madvise(address: int, length: int, advice: int, whole_pages_only: bool) -> None:
    """madvise on the pages of [address, address + length): only those wholly inside it
    (never a neighbour's), or every page it touches."""
    if whole_pages_only:
        start, end = -(-address // _PAGE) * _PAGE, (address + length) // _PAGE * _PAGE
    else:
        start, end = address // _PAGE * _PAGE, -(-(address + length) // _PAGE) * _PAGE
    if _MADVISE is not None and end > start:
        _MADVISE(start, end - start, advice)
