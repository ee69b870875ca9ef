"""Choose matmul kernels per machine by measuring them (`python -m llama.tune`).

For a weight layout, a shape [N, K], a number of rows of x (in buckets 1, 2, 4, 8, 16, 32)
and the activation dtype, the candidates are each native code path this CPU runs,
PyTorch's plain kernels ("torch") and oneDNN ("onednn"); quantized weights reach the
PyTorch candidates dequantized. Each is timed on weights it has not just read (copies
rotate past the last-level cache, as in a decode step where every weight is read once),
and the fastest is kept in $LLAMA_CACHE/tune/<machine>-torch<version>-kernels<hash>.json,
keyed by CPU model, flags, core count, torch version and the kernels' sources, so another
machine (or another version of the kernels) never inherits this one's choices.

A shape nobody measured yet is measured at first use when that is cheap (weights up to
AUTO_TUNE_MAX_BYTES); otherwise a default applies until `python -m llama.tune` runs.
LLAMA_TUNE=0 turns measuring at first use off.
"""

import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..assets import cache_dir
from .cpu import cpu_flags, cpu_model, machine_key
from .layouts import is_quantized, packed_shape

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
BF16_ONLY_PATHS = ("avx512_bf16", "amx")  # own code for bf16 weights x bf16 activations only
AUTO_TUNE_MAX_BYTES = 64 << 20  # measure at first use only for weights up to this size
_COLD_BYTES = 192 << 20          # copies of a small weight rotate through this much memory
_memo: Dict[str, str] = {}


def row_bucket(m: int) -> Optional[int]:
    """The bucket a number of rows is tuned in; None past the native kernels' range."""
    return next((b for b in ROW_BUCKETS if m <= b), None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def entry_key(layout: str, n: int, k: int, m: int, dtype: torch.dtype) -> str:
    return f"{layout}|{n}|{k}|{row_bucket(m)}|{_dtype_name(dtype)}"


def cache_file() -> Path:
    from .build import sources_digest

    return cache_dir() / "tune" / f"{machine_key()}-torch{torch.__version__}-kernels{sources_digest()[:8]}.json"


def candidates(layout: str, dtype: torch.dtype) -> List[str]:
    """Kernels worth timing: the fastest-looking native paths, and PyTorch's two."""
    from . import paths

    native = paths()
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
    return f"native:{usable[-1]}"


def read_cache(path: Optional[Path] = None) -> dict:
    """A cache file of measurements (default: the kernels'), {} when there is none yet."""
    try:
        return json.loads((path or cache_file()).read_text())
    except (OSError, ValueError):
        return {}


def write_entries(entries: Dict[str, dict], path: Optional[Path] = None) -> None:
    """Merge entries into a cache file (default: the kernels'), under a lock, replacing it atomically."""
    from filelock import FileLock

    path = path or cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=120):
        data = read_cache(path)
        data.update({"cpu": cpu_model(), "flags": " ".join(cpu_flags()), "torch": torch.__version__})
        data.setdefault("entries", {}).update(entries)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)


def best_time(calls: Sequence[Callable[[], object]], reps: int) -> float:
    """Seconds of one uninterrupted call: each rep runs every call once (one per weight
    copy, so no copy is still cached when it comes round again); the fastest rep counts,
    not the median: on a shared machine a rep that waits for a preempted thread measures
    the neighbours, not the kernel."""
    for call in calls[:2]:
        call()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best


def _sample_weight(layout: str, n: int, k: int) -> torch.Tensor:
    """A stored weight of shape [n, k] (a few random rows repeated: fast to make)."""
    from . import pack

    base = pack(torch.randn(min(n, 64), k), layout)
    return base.repeat((n + base.shape[0] - 1) // base.shape[0], 1)[:n].contiguous()


def measure(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16,
            weight: Optional[torch.Tensor] = None, reps: int = 5) -> Dict[str, float]:
    """Microseconds of each candidate kernel for x [m, k] @ W[n, k]^T (see best_time)."""
    from . import linear

    weight = _sample_weight(layout, n, k) if weight is None else weight
    nbytes = weight.numel() * weight.element_size()
    copies = [weight] + [weight.clone() for _ in range(min(255, _COLD_BYTES // max(nbytes, 1)))]
    x = torch.randn(m, k).to(dtype)
    return {kernel: 1e6 * best_time([lambda w=w, kernel=kernel: linear(x, w, layout, kernel) for w in copies], reps)
            for kernel in candidates(layout, dtype)}


def tune(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16,
         weight: Optional[torch.Tensor] = None, save: bool = True) -> dict:
    """Measure the candidates for one case and remember the fastest."""
    times = measure(layout, n, k, m, dtype, weight)
    result = {"best": min(times, key=times.get), "us": {c: round(t, 1) for c, t in times.items()}}
    key = entry_key(layout, n, k, m, dtype)
    _memo[key] = result["best"]
    if save:
        write_entries({key: result})
    return result


def best_kernel(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel to run for this case: measured on this machine, else a default."""
    key = entry_key(layout, n, k, m, dtype)
    found = _memo.get(key)
    if found is not None:
        return found
    if row_bucket(m) is None:
        found = default_kernel(layout, m, dtype)
    else:
        entry = read_cache().get("entries", {}).get(key)
        if entry is not None:
            found = entry["best"]
        elif os.environ.get("LLAMA_TUNE", "1") != "0" and _cheap(layout, n, k):
            found = tune(layout, n, k, row_bucket(m), dtype)["best"]
        else:
            found = default_kernel(layout, m, dtype)
    _memo[key] = found
    return found


def _cheap(layout: str, n: int, k: int) -> bool:
    rows, cols = packed_shape(layout, n, k)
    return rows * cols * {"f32": 4, "bf16": 2}.get(layout, 1) <= AUTO_TUNE_MAX_BYTES


def forget() -> None:
    """Drop what this process remembers (not the cache file)."""
    _memo.clear()


# ---- python -m llama.tune -------------------------------------------------------------------

# The matmul shapes [N, K] of a decode step at model-parallel size 1.
MODEL_SHAPES = {
    "demo": dict(dim=576, n_heads=9, n_kv_heads=3, hidden=1536, vocab=49152),      # SmolLM2-135M
    "1b": dict(dim=2048, n_heads=32, n_kv_heads=8, hidden=8192, vocab=128256),     # Llama-3.2-1B
}


def model_shapes(dim: int, n_heads: int, n_kv_heads: int, hidden: int, vocab: int) -> Dict[str, tuple]:
    head_dim = dim // n_heads
    return {"wq/wo": (n_heads * head_dim, dim), "wk/wv": (n_kv_heads * head_dim, dim), "w1/w3": (hidden, dim),
            "w2": (dim, hidden), "output": (vocab, dim)}


def _shapes_of(model: str) -> Dict[str, tuple]:
    from ..errors import LlamaError

    if model in MODEL_SHAPES:
        return model_shapes(**MODEL_SHAPES[model])
    params_file = Path(model) / "params.json"
    if not params_file.is_file():
        raise LlamaError(f"--model {model!r} is neither {' nor '.join(MODEL_SHAPES)} nor a checkpoint "
                         f"directory with params.json")
    from ..model import ModelArgs

    args = ModelArgs.from_params(json.loads(params_file.read_text()))
    if args.vocab_size <= 0:
        raise LlamaError(f"{params_file} has no vocab_size; pass --model demo or 1b for the shapes")
    return model_shapes(args.dim, args.n_heads, args.kv_heads, args.ffn_hidden_dim, args.vocab_size)


def _items(value) -> List[str]:
    """A comma-separated option as a list (fire turns "a,b" into a tuple by itself)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in parts if str(p).strip()]


def main(model: str = "demo", layouts: str = "bf16,q8_0,q4_0,q4_1", rows: str = "1,2,4,8,16,32",
         dtype: str = "bf16") -> None:
    """Measure every kernel for a model's matmul shapes on this machine and cache the winners.

    Args:
        model: "demo" (SmolLM2-135M), "1b" (Llama-3.2-1B) or a checkpoint directory.
        layouts: weight layouts, comma-separated (f32, bf16, q8_0, q4_0, q4_1).
        rows: rows of x (batch size of a decode step), comma-separated, up to 32.
        dtype: activation dtype, bf16 or fp32.
    """
    from ..errors import LlamaError
    from . import available, build
    from .layouts import check_layout

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise LlamaError(f"--dtype {dtype!r}: use bf16 or fp32")
    layout_list = _items(layouts)
    for name in layout_list:
        check_layout(name)
    try:
        row_list = sorted({int(r) for r in _items(rows)})
    except ValueError:
        raise LlamaError(f"--rows {rows!r}: give whole numbers, e.g. 1,16") from None
    if not row_list or row_list[0] < 1 or row_list[-1] > ROW_BUCKETS[-1]:
        raise LlamaError(f"--rows {rows!r}: give numbers from 1 to {ROW_BUCKETS[-1]}")
    shapes = _shapes_of(model)
    print(f"{cpu_model()}, torch {torch.__version__}, native kernels: "
          f"{'on' if available() else 'off (' + build.status()['reason'] + ')'}")
    print(f"{'layout':6} {'matmul':7} {'N x K':>13} {'rows':>4}  {'best':18} {'GB/s':>6}  all (us)")
    for layout in layout_list:
        for name, (n, k) in shapes.items():
            n_bytes = packed_shape(layout, n, k)[0] * packed_shape(layout, n, k)[1] * \
                {"f32": 4, "bf16": 2}.get(layout, 1)
            weight = _sample_weight(layout, n, k)
            for m in row_list:
                result = tune(layout, n, k, m, torch_dtype, weight)
                best_us = result["us"][result["best"]]
                others = ", ".join(f"{c} {t:.0f}" for c, t in result["us"].items())
                print(f"{layout:6} {name:7} {n:>6} x {k:<5} {m:>4}  {result['best']:18} "
                      f"{n_bytes / best_us / 1e3:6.1f}  {others}", flush=True)
    print(f"saved to {cache_file()}")
