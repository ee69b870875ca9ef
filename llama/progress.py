"""Progress bars: shown on rank 0 when stderr is a terminal (LLAMA_PROGRESS=1 forces
them on, LLAMA_PROGRESS=0 off), so logs and pipes stay clean."""

import os
import sys
from typing import Iterable, Optional, TypeVar

from .distributed import is_main_rank

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "tensor") -> Iterable[T]:
    forced = os.environ.get("LLAMA_PROGRESS")
    show = forced == "1" or (forced != "0" and sys.stderr.isatty())
    if not show or not is_main_rank():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False)
