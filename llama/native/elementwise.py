"""A bf16 model's elementwise work between its matmuls in one native pass per row (CPU,
AVX-512): the residual add with RMSNorm, and SwiGLU.

    h, y = add_rms_norm(x, add, weight, eps)   # h = x + add, y = RMSNorm(h) * weight
    y = add_rms_norm(x, None, weight, eps)[1]  # RMSNorm(x) * weight
    out = swiglu(gate, up)                     # silu(gate) * up

Each rounds to bf16 where llama/model/transformer.py's PyTorch code rounds (csrc/elementwise.h),
instead of PyTorch's several passes with fp32 copies between them. The model uses it where
fused() says so: bf16 tensors on a CPU whose native library runs its AVX-512 path.
"""

from typing import Optional, Tuple

import torch

from ..errors import LlamaError
from . import _lib, paths, problem

PATH = "avx512"  # the code path it needs


def fused(x: torch.Tensor) -> bool:
    """Whether the fused passes take x (bf16, on the CPU, the native AVX-512 path here)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and \
        problem(x.device, x.dtype) is None and PATH in paths()


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as [rows, last dim] with dense rows: a view where its rows are evenly strided (the
    halves of a fused product), else a copy; LlamaError where the fused passes cannot take it."""
    if not fused(t):
        raise LlamaError(f"{name} is {t.dtype} on {t.device}: the fused passes take bf16 on an AVX-512 CPU")
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _row_stride(rows: torch.Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


def add_rms_norm(x: torch.Tensor, add: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + add (x itself where add is None), y = RMSNorm(h) * weight, as
    `F.rms_norm(h.float(), (dim,), eps=eps).type_as(h) * weight` in bf16."""
    given, shape = x, x.shape
    x = _rows(x, "x").contiguous()  # the native pass takes dense rows
    dim = shape[-1]
    if weight.shape != (dim,) or weight.dtype != torch.bfloat16:
        raise LlamaError(f"add_rms_norm(): weight must be bf16 [{dim}]; got {weight.dtype} {list(weight.shape)}")
    if add is not None:
        if add.shape != shape:
            raise LlamaError(f"add_rms_norm(): add {list(add.shape)} differs from x {list(shape)}")
        add = _rows(add, "add").contiguous()
    h = torch.empty_like(x) if add is not None else None
    y = torch.empty_like(x)
    rc = _lib().llama_add_rms_norm_bf16(x.data_ptr(), None if add is None else add.data_ptr(),
                                        weight.contiguous().data_ptr(), x.shape[0], dim, eps,
                                        None if h is None else h.data_ptr(), y.data_ptr(), 0)
    if rc != 0:
        raise RuntimeError(f"native add_rms_norm failed with code {rc}")
    return given if h is None else h.view(shape), y.view(shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in bf16, as `F.silu(gate) * up`; gate and up [..., hidden] may be views
    with a row stride (the halves of one fused product)."""
    hidden = gate.shape[-1]
    if up.shape != gate.shape:
        raise LlamaError(f"swiglu(): gate {list(gate.shape)} and up {list(up.shape)} differ")
    gate2, up2 = _rows(gate, "gate"), _rows(up, "up")
    out = torch.empty(gate.shape, dtype=torch.bfloat16)
    rows = out.numel() // hidden
    rc = _lib().llama_swiglu_bf16(gate2.data_ptr(), up2.data_ptr(), rows, hidden, _row_stride(gate2),
                                  _row_stride(up2), out.data_ptr(), 0)
    if rc != 0:
        raise RuntimeError(f"native swiglu failed with code {rc}")
    return out


