"""Native CPU kernels for decode-sized matmuls, with PyTorch as the fallback.

    y [..., N] = x [..., K] @ W^T      W [N, K] stored in a layout (see llama.native.layouts):
                                       "f32", "bf16", or GGML's "q8_0", "q4_0", "q4_1" blocks

For up to MAX_NATIVE_ROWS rows of x (decode steps) the C++ kernels read W once for all
rows, accumulate in fp32 and run on torch's own OpenMP threads; larger inputs (prefill)
dequantize W in slices of rows and use PyTorch's GEMM. Which kernel runs for a given
(layout, N, K, rows, dtype) is chosen by measurement on this machine
(llama.native.kernel_choice, `python -m llama.tune`). Activations may be fp32 or bf16;
the output has x's dtype. The quantized kernels quantize x to int8 per block of 32 (fp32
scale), as llama.cpp does.

    from llama import native
    native.available()                        # built and loaded here?
    blocks = native.quantize(w, "q4_0")       # [N, K] float -> uint8 [N, K/32*18]
    y = native.linear(x, blocks, "q4_0")      # x [..., K] -> y [..., N]
    layer = native.NativeLinear(w, "q8_0")    # an nn.Module doing the same

A NativeLinear keeps quantized blocks in the form its kernels read fastest here: on AVX-512
machines, where measured faster, interleaved 16 rows at a time ("q4_0x16", see layouts.py;
interleave() makes and undoes it). Its state_dict always holds GGML's blocks.

This package is mechanism only: it imports nothing of the model or the runtime, which use it.
"""

import ctypes
import threading
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..errors import LlamaError
from . import build
from .layouts import (
    BLOCK,
    BLOCK_BYTES,
    FLOAT_LAYOUTS,
    LAYOUT_IDS,
    LAYOUTS,
    base_layout,
    check_layout,
    in_features,
    is_interleaved,
    is_quantized,
    packed_shape,
    torch_dequantize,
    torch_quantize,
)

__all__ = ["available", "paths", "problem", "quantize", "dequantize", "pack", "interleave", "linear", "NativeLinear",
           "best_linear_kernel", "LAYOUTS", "PATHS", "MAX_NATIVE_ROWS", "BLOCK", "BLOCK_BYTES"]

PATHS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")  # code paths, as numbered in csrc/common.h
MAX_NATIVE_ROWS = 32  # the native kernels are built for decode-sized inputs
_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1}
_DEQUANT_ROWS = 4096  # rows of W dequantized at a time for PyTorch's GEMM (a multiple of 16) ...
_DEQUANT_BYTES = 64 << 20  # ... within this much memory, kept for the next product (see _dequant_buffer)
_INTERLEAVED_PATHS = ("avx512", "avx512_bf16", "amx")  # the latter two hand these to avx512


def _lib() -> Optional[ctypes.CDLL]:
    lib = build.load()
    if lib is not None and not getattr(lib, "_typed", False):
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.llama_linear.argtypes = [i32, i32, vp, i32, i64, i64, vp, i64, vp, i32, i32]
        lib.llama_quantize.argtypes = [i32, vp, i64, i64, vp, i32]
        lib.llama_dequantize.argtypes = [i32, vp, i64, i64, vp, i32, i32, i32]
        lib.llama_interleave.argtypes = [i32, vp, i64, i64, vp, i32, i32]
        lib.llama_causal_attention.argtypes = [vp] * 4 + [i64] * 11 + [ctypes.c_float, i32]
        lib.llama_add_rms_norm_bf16.argtypes = [vp, vp, vp, i64, i64, ctypes.c_float, vp, vp, i32]
        lib.llama_swiglu_bf16.argtypes = [vp, vp, i64, i64, i64, i64, vp, i32]
        lib._typed = True
    return lib


def available() -> bool:
    """True when the native library is built and loaded (not with LLAMA_NATIVE=0)."""
    return _lib() is not None


def problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the native kernels cannot run for a model on `device` computing in `dtype` here,
    or None when they can."""
    if settings.get("LLAMA_NATIVE") == "0":
        return "LLAMA_NATIVE=0"
    if device.type != "cpu":
        return f"the model is on {device}; native kernels are for the CPU"
    if dtype not in _DTYPE_IDS:
        return f"the model is {dtype}; native kernels run fp32 and bf16 models"
    if not available():
        return f"the native library is off ({build.status()['reason']})"
    return None


def paths() -> List[str]:
    """The native code paths this machine runs, slowest first (empty when not available)."""
    lib = _lib()
    if lib is None:
        return []
    mask = lib.llama_native_paths()
    return [name for i, name in enumerate(PATHS) if mask >> i & 1]


def _check(rc: int, what: str) -> None:
    if rc != 0:  # the Python side validates first, so this is our bug, not the user's
        raise RuntimeError(f"native {what} failed with code {rc}")


def quantize(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """[N, K] float -> uint8 [N, K/32 * block bytes] in a quantized layout (GGML's rounding)."""
    check_layout(layout)
    if layout not in BLOCK_BYTES:
        raise LlamaError(f"quantize() makes q8_0, q4_0 or q4_1 blocks, not {layout!r}; use weight.to() for floats "
                         f"and interleave() for the interleaved forms")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise LlamaError(f"quantize() takes a float [N, K] weight; got {weight.dtype} {list(weight.shape)}")
    lib = _lib()
    if lib is None or weight.device.type != "cpu":
        return torch_quantize(weight, layout)
    src = weight.detach().float().contiguous()
    out = torch.empty(packed_shape(layout, *src.shape), dtype=torch.uint8)
    _check(lib.llama_quantize(LAYOUT_IDS[layout], src.data_ptr(), src.shape[0], src.shape[1], out.data_ptr(), 0),
           "quantize")
    return out


def dequantize(packed: torch.Tensor, layout: str, dtype: torch.dtype = torch.float32,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A stored weight -> [N, K] in `dtype` (fp32 or bf16 natively; others via fp32); into
    `out` (contiguous [N, K] of `dtype`) where given, which is returned."""
    check_layout(layout)
    if not is_quantized(layout):
        return _placed(packed.to(dtype), out)
    k = in_features(layout, packed)
    lib = _lib()
    if is_interleaved(layout) and dtype not in _DTYPE_IDS:
        return _placed(dequantize(packed, layout).to(dtype), out)
    _check_interleaved_here(layout, packed, lib)
    if lib is None or packed.device.type != "cpu" or dtype not in _DTYPE_IDS:
        return _placed(torch_dequantize(packed, layout, dtype), out)
    return _dequantize_into(packed, layout, torch.empty(packed.shape[0], k, dtype=dtype) if out is None else out)


def _placed(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _dequantize_into(packed: torch.Tensor, layout: str, out: torch.Tensor, path: Optional[str] = None) -> torch.Tensor:
    """The native dequantizer, into `out` (contiguous [N, K], fp32 or bf16), on code path
    "scalar" or "avx512" (None: the faster this CPU runs)."""
    packed = packed.contiguous()
    _check(_lib().llama_dequantize(LAYOUT_IDS[layout], packed.data_ptr(), packed.shape[0], out.shape[1],
                                   out.data_ptr(), _DTYPE_IDS[out.dtype], 0, -1 if path is None else PATHS.index(path)),
           "dequantize")
    return out


def pack(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The stored form of a weight: float [N, K] is converted or quantized; a uint8 tensor
    of blocks (e.g. straight from a GGUF file) is checked and kept as it is. An interleaved
    layout takes the float weight or its base layout's blocks, and interleaves them."""
    check_layout(layout)
    if is_interleaved(layout):
        return interleave(pack(weight, base_layout(layout)), layout)
    if is_quantized(layout):
        if weight.dtype == torch.uint8:
            in_features(layout, weight)  # validates the shape
            return weight.contiguous()
        return quantize(weight, layout)
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise LlamaError(f"a {layout} weight must be [N, K] with K a multiple of {BLOCK}; got {list(weight.shape)}")
    return weight.detach().to(FLOAT_LAYOUTS[layout]).contiguous()


def _check_interleaved_here(layout: str, packed: torch.Tensor, lib) -> None:
    """LlamaError where an interleaved form cannot be made or read: off the CPU or without the library."""
    if is_interleaved(layout) and (lib is None or packed.device.type != "cpu"):
        raise LlamaError(f"layout {layout!r} exists for the native CPU kernels: it needs a CPU tensor and the "
                         f"native library ({'on' if lib else 'off: ' + build.status()['reason']})")


def interleave(packed: torch.Tensor, layout: str, inverse: bool = False) -> torch.Tensor:
    """Blocks of a base layout [N, K/32 * block bytes] -> the same bytes in the interleaved
    `layout` ("q8_0x16", "q4_0x16", "q4_1x16"; N a multiple of 16), or back when `inverse`.
    Needs the native library (the interleaved forms exist for its kernels only)."""
    check_layout(layout)
    if not is_interleaved(layout):
        raise LlamaError(f"interleave() makes q8_0x16, q4_0x16 or q4_1x16, not {layout!r}")
    k = in_features(layout, packed)
    lib = _lib()
    _check_interleaved_here(layout, packed, lib)
    src = packed.contiguous()
    out = torch.empty_like(src)
    _check(lib.llama_interleave(LAYOUT_IDS[layout], src.data_ptr(), src.shape[0], k, out.data_ptr(), int(inverse), 0),
           "interleave")
    return out


_held = threading.local()  # this thread's buffer of dequantized rows


def _dequant_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, k] buffer for a slice of dequantized weights, kept per thread and reused by the
    next product: a fresh one page-faults its memory in, which took 4-5x the dequantizing
    itself (11 against 2.4 ms for 8192 x 2048 to bf16)."""
    held = getattr(_held, "buffer", None)
    if held is None or held.dtype != dtype or held.numel() < rows * k:
        held = _held.buffer = torch.empty(rows * k, dtype=dtype)
    return held[:rows * k].view(rows, k)


def _torch_linear(x: torch.Tensor, packed: torch.Tensor, layout: str, onednn: bool) -> torch.Tensor:
    """PyTorch's GEMM on W in x's dtype; quantized W is dequantized a slice of rows at a time
    (at most _DEQUANT_ROWS, and _DEQUANT_BYTES, a multiple of 16 rows) into a reused buffer."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        if not is_quantized(layout):
            return F.linear(x, packed.to(x.dtype))
        k = in_features(layout, packed)
        step = max(16, min(_DEQUANT_ROWS, _DEQUANT_BYTES // (k * x.element_size())) // 16 * 16)
        parts = []
        for r in range(0, packed.shape[0], step):
            rows = packed[r:r + step]
            weight = dequantize(rows, layout, x.dtype, out=_dequant_buffer(rows.shape[0], k, x.dtype))
            parts.append(F.linear(x, weight))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    finally:
        torch.backends.mkldnn.enabled = saved


def native_linear(x: torch.Tensor, packed: torch.Tensor, layout: str, path: str, threads: int = 0) -> torch.Tensor:
    """The native kernel on one code path, for x [M, K] (fp32 or bf16, contiguous, CPU).
    threads: 0 for torch's thread team, 1 for the calling thread only."""
    lib = _lib()
    m, k = x.shape
    n = packed.shape[0]
    dtype, row = FLOAT_LAYOUTS.get(layout, torch.uint8), k // BLOCK * BLOCK_BYTES.get(base_layout(layout), BLOCK)
    if packed.dtype != dtype or packed.shape[1] != row or k % BLOCK or not packed.is_contiguous():
        raise LlamaError(f"a {layout} weight for x with {k} features must be contiguous {dtype} [{n}, {row}] "
                         f"(K a multiple of {BLOCK}); got {packed.dtype} {list(packed.shape)}")
    if is_interleaved(layout) and path not in _INTERLEAVED_PATHS:
        raise LlamaError(f"layout {layout!r} runs on the {' or '.join(_INTERLEAVED_PATHS)} paths, not {path!r}")
    y = torch.empty(m, n, dtype=x.dtype)
    dt = _DTYPE_IDS[x.dtype]
    _check(lib.llama_linear(LAYOUT_IDS[layout], PATHS.index(path), x.data_ptr(), dt, m, k, packed.data_ptr(), n,
                            y.data_ptr(), dt, threads), "linear")
    return y


def linear(x: torch.Tensor, packed: torch.Tensor, layout: str, kernel: Optional[str] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T, W stored in `layout` (from pack()/quantize()).

    kernel: "native:<path>", "torch" (PyTorch's plain kernels), "onednn", or None for
    this machine's measured best (best_linear_kernel)."""
    k = in_features(layout, packed)
    if x.shape[-1] != k:
        raise LlamaError(f"linear(): x has {x.shape[-1]} features but the {layout} weight takes {k}")
    flat = x.reshape(-1, k)
    m = flat.shape[0]
    if kernel is None:
        kernel = best_linear_kernel(layout, packed.shape[0], k, m, x.dtype)
    if (kernel.startswith("native:") and m <= MAX_NATIVE_ROWS and x.dtype in _DTYPE_IDS
            and x.device.type == "cpu" and packed.is_contiguous() and available()):
        return native_linear(flat.contiguous(), packed, layout, kernel[7:]).view(*x.shape[:-1], packed.shape[0])
    return _torch_linear(x, packed, layout, onednn=kernel == "onednn")


def best_linear_kernel(layout: str, n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The fastest kernel measured on this machine for y[m, n] = x[m, k] @ W^T (see tune)."""
    from .kernel_choice import best_kernel

    return best_kernel(layout, n, k, m, dtype)


class NativeLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in `layout` and run by linear().

    weight: float [N, K] (converted or quantized here) or, for a quantized layout, the
    uint8 blocks themselves [N, K/32 * block bytes], e.g. a GGUF tensor's bytes.
    `stored` is the form kept in memory: `layout`, or its interleaved form where that was
    measured faster here (kernel_choice.stored_layout); state_dict() holds `layout`'s blocks."""

    def __init__(self, weight: torch.Tensor, layout: str):
        super().__init__()
        from .kernel_choice import stored_layout

        if is_interleaved(layout):
            raise LlamaError(f"NativeLinear takes {base_layout(layout)!r}; it interleaves by itself where faster")
        self.layout = layout
        packed = pack(weight, layout)
        self.stored = stored_layout(layout, packed.shape[0], in_features(layout, packed))
        self.register_buffer("packed", interleave(packed, self.stored) if self.stored != layout else packed)
        self.out_features, self.in_features = self.packed.shape[0], in_features(layout, self.packed)

    @classmethod
    def from_linear(cls, module: nn.Module, layout: str) -> "NativeLinear":
        return cls(module.weight.detach(), layout)

    def blocks(self) -> torch.Tensor:
        """The weight in `layout` (GGML's blocks, as a GGUF file holds them)."""
        return self.packed if self.stored == self.layout else interleave(self.packed, self.stored, inverse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.stored)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "packed"] = self.blocks()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        given = state_dict.get(prefix + "packed")
        if self.stored != self.layout and isinstance(given, torch.Tensor) and given.shape == self.packed.shape:
            state_dict = {**state_dict, prefix + "packed": interleave(given, self.stored)}  # the caller's stays
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        form = f", stored={self.stored}" if self.stored != self.layout else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}{form}"
