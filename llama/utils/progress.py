"""Progress bars: shown on rank 0 when stderr is a terminal (LLAMA_PROGRESS=1 forces
them on, LLAMA_PROGRESS=0 off), so logs and pipes stay clean."""

import sys
from typing import Any, Iterable, Optional, TypeVar

from .. import settings
from .ranks import is_main_rank

T = TypeVar("T")


def _shown() -> bool:
    forced = settings.get("LLAMA_PROGRESS")
    return (forced == "1" or (forced is None and sys.stderr.isatty())) and is_main_rank()


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "tensor") -> Iterable[T]:
    if not _shown():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False)


class _Silent:
    """A counter that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def counter(desc: str, total: int, unit: str) -> Any:
    """A bar advanced by hand (update(n), set_postfix_str, close), or one that shows nothing."""
    if not _shown():
        return _Silent()
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, leave=False)
