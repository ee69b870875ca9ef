"""python -m llama.tune: measure the matmul kernels for a model's shapes on this machine and
keep the fastest for each (llama.native.kernel_choice), so that no run measures at first use."""

from pathlib import Path
from typing import Dict, List

import torch

from .checkpoint.params import load_params
from .errors import LlamaError
from .model.args import ModelArgs
from .native import available, build
from .native.kernel_choice import ROW_BUCKETS, interleaved_form, sample_weight, tune
from .native.layouts import check_layout, packed_shape
from .utils.cpu import cpu_model
from .utils.measurements import verdict_file

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
    if model in MODEL_SHAPES:
        return model_shapes(**MODEL_SHAPES[model])
    params_file = Path(model) / "params.json"
    if not params_file.is_file():
        raise LlamaError(f"--model {model!r} is neither {' nor '.join(MODEL_SHAPES)} nor a checkpoint "
                         f"directory with params.json")
    args = ModelArgs.from_params(load_params(model))
    if args.vocab_size <= 0:
        raise LlamaError(f"{params_file} has no vocab_size; pass --model demo or 1b for the shapes")
    return model_shapes(args.dim, args.n_heads, args.kv_heads, args.ffn_hidden_dim, args.vocab_size)


def _items(value) -> List[str]:
    """A comma-separated option as a list (fire turns "a,b" into a tuple by itself)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in parts if str(p).strip()]


def _forms(layout: str, n: int) -> List[str]:
    """A layout, and its interleaved form where this machine could keep the weight in it."""
    form = interleaved_form(layout, n)
    return [layout] if form is None else [layout, form]


def main(model: str = "demo", layouts: str = "bf16,q8_0,q4_0,q4_1", rows: str = "1,2,4,8,16,32",
         dtype: str = "bf16") -> None:
    """Measure every kernel for a model's matmul shapes on this machine and cache the winners.

    Args:
        model: "demo" (SmolLM2-135M), "1b" (Llama-3.2-1B) or a checkpoint directory.
        layouts: weight layouts, comma-separated (f32, bf16, q8_0, q4_0, q4_1).
        rows: rows of x (batch size of a decode step), comma-separated, up to 32.
        dtype: activation dtype, bf16 or fp32.
    """
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
    print(f"{'layout':7} {'matmul':7} {'N x K':>13} {'rows':>4}  {'best':18} {'GB/s':>6}  all (us)")
    for layout in layout_list:
        for name, (n, k) in shapes.items():
            n_bytes = packed_shape(layout, n, k)[0] * packed_shape(layout, n, k)[1] * \
                {"f32": 4, "bf16": 2}.get(layout, 1)
            for form in _forms(layout, n):  # the interleaved form too, which NativeLinear picks by these
                weight = sample_weight(form, n, k)
                for m in row_list:
                    result = tune(form, n, k, m, torch_dtype, weight)
                    best_us = result["us"][result["best"]]
                    others = ", ".join(f"{c} {t:.0f}" for c, t in result["us"].items())
                    print(f"{form:7} {name:7} {n:>6} x {k:<5} {m:>4}  {result['best']:18} "
                          f"{n_bytes / best_us / 1e3:6.1f}  {others}", flush=True)
    print(f"saved to {verdict_file('kernels')}")


if __name__ == "__main__":
    from .cli import run

    run(main)
