"""GGML's block layouts (q8_0, q4_0, q4_1) for the native CPU kernels: a projection's slice
becomes a NativeLinear holding only its blocks, so the model takes the quantized bytes in
memory. Decode-sized inputs read the blocks with the native kernels; prefill (many rows)
dequantizes them a slice of rows at a time into the activations' dtype for PyTorch's GEMM.
Embeddings and norms stay in the model's dtype; in the 4-bit modes the output projection
is q8_0, as llama.cpp does (it costs most of their quality on small models otherwise).

Splitting a weight across model-parallel ranks at multiples of 32 input features keeps its
blocks whole, so each rank's blocks are exactly those of the unsplit weight.
"""

from typing import Optional

import torch
from torch import nn

from ... import native
from ...errors import LlamaError
from ...native import BLOCK, NativeLinear
from ...native.layouts import BLOCK_BYTES

OUTPUT_LAYOUT = {"q4_0": "q8_0", "q4_1": "q8_0"}  # the output projection's layout in 4-bit modes


def check_blocks(layout: str, device: torch.device, dtype: torch.dtype,
                 layers: "dict[str, nn.Module]") -> None:
    """LlamaError unless `layers` (name -> parallel linear layer) can run as `layout` blocks on
    the native kernels here: a CPU, fp32 or bf16 activations, the library built, and each
    layer's slice of input features a multiple of 32."""
    if layout not in BLOCK_BYTES:
        raise LlamaError(f"layout={layout!r} is not one of {', '.join(BLOCK_BYTES)}")
    problem = native.problem(device, dtype)
    if problem is None:
        odd = [f"{name} ({layer.weight.shape[1]})" for name, layer in layers.items() if layer.weight.shape[1] % BLOCK]
        if odd:
            problem = (f"the input features of {', '.join(odd[:3])} on this rank are not a multiple of {BLOCK}, "
                       f"which the native kernels need (fewer model-parallel processes may fix it)")
    if problem is not None:
        raise LlamaError(f"quantize={layout!r} runs on native CPU kernels, which cannot run here: {problem}; "
                         f"use quantize='int8' or None")


def block_kernel(weight: torch.Tensor, layout: str, output: bool = False) -> NativeLinear:
    """The product module of one slice in `layout` (the output projection: OUTPUT_LAYOUT)."""
    return NativeLinear(weight.detach(), OUTPUT_LAYOUT.get(layout, layout) if output else layout)


def block_layout(kernel: Optional[nn.Module]) -> Optional[str]:
    """The GGML layout of a layer's kernel, or None for a float or int8 product."""
    return kernel.layout if isinstance(kernel, NativeLinear) else None
