"""Which kernel runs each matmul on this machine, chosen by measuring (`python -m llama.tune`
measures a model's shapes all at once).

For a weight layout, a shape [N, K], a number of rows of x (in buckets 1, 2, 4, 8, 16, 32)
and the activation dtype, the candidates are each native code path this CPU runs,
PyTorch's plain kernels ("torch") and oneDNN ("onednn"); quantized weights reach the
PyTorch candidates dequantized. Each is timed on weights it has not just read (copies
rotate past the last-level cache, as in a decode step where every weight is read once),
and the fastest is kept in $LLAMA_CACHE/tune/kernels.json (llama.utils.measurements), keyed
by the machine, the torch version and the kernels' sources, so another machine (or another
version of the kernels) never inherits this one's choices.

A shape nobody measured yet is measured at first use when that is cheap (weights up to
AUTO_TUNE_MAX_BYTES); otherwise a default applies until `python -m llama.tune` runs.
LLAMA_TUNE=0 turns measuring at first use off.

Quantized weights may also be kept interleaved 16 rows at a time (layouts.INTERLEAVED),
which only the AVX-512 path reads: stored_layout() keeps that form unless the plain one's
fastest kernel at one row of x (a batch-1 decode step) measured clearly faster.
"""

import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from .. import settings
from ..utils.measurements import best_time, kept, lookup, machine_fields, stable_times, verdict_file
from ..utils.ranks import print0
from .layouts import GROUP_ROWS, INTERLEAVED, is_interleaved, is_quantized, packed_shape

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
BF16_ONLY_PATHS = ("avx512_bf16", "amx")  # own code for bf16 weights x bf16 activations only
INTERLEAVED_PATH = "avx512"  # the code path that reads the interleaved layouts
PLAIN_FORM_MARGIN = 0.85  # a weight stays in GGML's order only where that is this much faster at one row
AUTO_TUNE_MAX_BYTES = 64 << 20  # measure at first use only for weights up to this size
# First-use measurement may take this much of a process's time; the cases left take defaults
# (not kept) until `python -m llama.tune` or a later run measures them.
AUTO_TUNE_BUDGET_S = 15.0
STABLE_ROUNDS = 3  # the most rounds a case is timed in (until two agree on the winner)
_auto_spent = [0.0, False]  # seconds this process spent measuring at first use; said it stopped
_COLD_BYTES = 192 << 20          # copies of a small weight rotate through this much memory
_memo: Dict[Tuple, str] = {}  # what this process already knows: (layout, n, k, bucket, dtype) -> kernel


def row_bucket(m: int) -> Optional[int]:
    """The bucket a number of rows is tuned in; None past the native kernels' range."""
    return next((b for b in ROW_BUCKETS if m <= b), None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def verdict_key(layout: str, n: int, k: int, m: int, dtype: torch.dtype) -> dict:
    """What the kernel chosen for x [m, k] @ W[n, k]^T depends on: the machine, the kernels'
    sources, the layout, the shape, the row bucket of m and the activation dtype."""
    from .build import sources_digest

    return {**machine_fields(), "kernels": sources_digest()[:16], "layout": layout, "n": n, "k": k,
            "rows": row_bucket(m), "dtype": _dtype_name(dtype)}


def candidates(layout: str, dtype: torch.dtype) -> List[str]:
    """Kernels worth timing: the fastest-looking native paths, and PyTorch's two."""
    from . import paths

    native = paths()
    if is_interleaved(layout):  # only the AVX-512 path reads these
        native = [p for p in native if p == INTERLEAVED_PATH]
    if len(native) > 1:  # the scalar path only matters where nothing faster exists
        native = native[1:]
    if not (layout == "bf16" and dtype == torch.bfloat16):
        native = [p for p in native if p not in BF16_ONLY_PATHS]  # the same code as avx512 there
    return [f"native:{p}" for p in native] + ["torch", "onednn"]


def default_kernel(layout: str, m: int, dtype: torch.dtype) -> str:
    """Before anything is measured: the newest native path for decode-sized inputs, oneDNN
    (PyTorch's GEMM) beyond; plain kernels for float weights when only scalar code exists."""
    from . import MAX_NATIVE_ROWS, paths

    native = paths()
    if m > MAX_NATIVE_ROWS or not native:
        return "onednn"
    if native == ["scalar"] and not is_quantized(layout):
        return "torch"
    usable = [p for p in native if p not in BF16_ONLY_PATHS or (layout == "bf16" and dtype == torch.bfloat16)]
    if is_interleaved(layout):
        usable = [INTERLEAVED_PATH]
    return f"native:{usable[-1]}"


def sample_weight(layout: str, n: int, k: int) -> torch.Tensor:
    """A stored weight of shape [n, k] (a few random rows repeated: fast to make)."""
    from . import pack

    base = pack(torch.randn(min(n, 64), k), layout)
    return base.repeat((n + base.shape[0] - 1) // base.shape[0], 1)[:n].contiguous()


def measure(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16,
            weight: Optional[torch.Tensor] = None, reps: int = 5) -> Dict[str, float]:
    """Microseconds of each candidate kernel for x [m, k] @ W[n, k]^T (see best_time)."""
    from . import linear

    weight = sample_weight(layout, n, k) if weight is None else weight
    nbytes = weight.numel() * weight.element_size()
    copies = [weight] + [weight.clone() for _ in range(min(255, _COLD_BYTES // max(nbytes, 1)))]
    x = torch.randn(m, k).to(dtype)
    return {kernel: 1e6 * best_time([lambda w=w, kernel=kernel: linear(x, w, layout, kernel) for w in copies], reps)
            for kernel in candidates(layout, dtype)}


def tune(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16,
         weight: Optional[torch.Tensor] = None, again: bool = True) -> dict:
    """Measure the candidates for one case and keep the fastest: {"best", "us"}. again=False:
    only if no process has kept a verdict for it yet."""
    def measured(_) -> dict:
        best, rounds = stable_times(lambda: measure(layout, n, k, m, dtype, weight), STABLE_ROUNDS)
        return {"best": min(best, key=best.get), "us": {c: round(t, 1) for c, t in best.items()}, "rounds": rounds}

    key = verdict_key(layout, n, k, m, dtype)
    result = kept(verdict_file("kernels"), {0: key}, measured, "the matmul kernel measurement", again=again)[0]
    _memo[(layout, n, k, row_bucket(m), dtype)] = result["best"]
    return result


def best_kernel(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel to run for this case: measured on this machine, else a default."""
    memo = (layout, n, k, row_bucket(m), dtype)
    found = _memo.get(memo)
    if found is not None:
        return found
    entry = None if row_bucket(m) is None else _verdict(layout, n, k, m, dtype)
    found = _memo[memo] = default_kernel(layout, m, dtype) if entry is None else entry["best"]
    return found


def _verdict(layout: str, n: int, k: int, m: int, dtype: torch.dtype) -> Optional[dict]:
    """The kept verdict for this case ({"best", "us"}), or measured now where first-use timing
    may (LLAMA_TUNE=1, a cheap weight, within the budget); None when unknown."""
    entry = lookup(verdict_file("kernels"), verdict_key(layout, n, k, m, dtype))
    if entry is None and settings.get("LLAMA_TUNE") == "1" and _cheap(layout, n, k) and _within_budget():
        start = time.perf_counter()
        entry = tune(layout, n, k, row_bucket(m), dtype, again=False)
        _auto_spent[0] += time.perf_counter() - start
    return entry


def stored_layout(layout: str, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The form to keep an [n, k] weight of `layout` in: its interleaved form (INTERLEAVED)
    where the AVX-512 path runs, unless the plain form's fastest kernel at one row of x measured
    clearly faster (PLAIN_FORM_MARGIN: the interleaved form is 1.7-2.7x faster from 4 rows up,
    so a tie at one row, or a noisy measurement of one, keeps it); measured at first use when
    cheap, or by `python -m llama.tune`; unmeasured, interleaved. LLAMA_INTERLEAVE=0 keeps every
    weight as it is."""
    form = interleaved_form(layout, n)
    if form is None or settings.get("LLAMA_INTERLEAVE") == "0":
        return layout
    memo = ("stored", layout, n, k, dtype)
    if memo not in _memo:
        times = [_fastest_us(candidate, n, k, dtype) for candidate in (layout, form)]
        _memo[memo] = layout if None not in times and times[0] < PLAIN_FORM_MARGIN * times[1] else form
    return _memo[memo]


def interleaved_form(layout: str, n: int) -> Optional[str]:
    """The interleaved form an [n, ...] weight of `layout` could be kept in on this machine, or None."""
    from . import paths

    form = INTERLEAVED.get(layout)
    return form if form is not None and n % GROUP_ROWS == 0 and INTERLEAVED_PATH in paths() else None


def _fastest_us(layout: str, n: int, k: int, dtype: torch.dtype) -> Optional[float]:
    """The fastest kernel's time at one row of x (_verdict); None when unknown."""
    entry = _verdict(layout, n, k, 1, dtype)
    return None if entry is None else min(entry["us"].values())


def _within_budget() -> bool:
    """Whether first-use measurement may go on in this process (AUTO_TUNE_BUDGET_S); says once
    when it stops."""
    if _auto_spent[0] < AUTO_TUNE_BUDGET_S:
        return True
    if not _auto_spent[1]:
        _auto_spent[1] = True
        print0(f"llama: first-use kernel timing stopped after {_auto_spent[0]:.0f} s; the shapes left use "
               f"default kernels this run (`python -m llama.tune` times them all)", file=sys.stderr, flush=True)
    return False


def _cheap(layout: str, n: int, k: int) -> bool:
    rows, cols = packed_shape(layout, n, k)
    return rows * cols * {"f32": 4, "bf16": 2}.get(layout, 1) <= AUTO_TUNE_MAX_BYTES


def forget() -> None:
    """Drop what this process remembers (not the cache file), and its first-use time spent."""
    _memo.clear()
    _auto_spent[:] = [0.0, False]
