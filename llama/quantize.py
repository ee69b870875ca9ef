"""Weight-only quantization, applied to a loaded model from outside by swapping each
parallel projection: "int8" here (an int8 layer that keeps its collective, as gpt-fast
does), "q8_0", "q4_0", "q4_1" in GGML's block layouts for the native CPU kernels
(llama.native.quantized_model; CPU, model-parallel size 1).

Each projection's weight becomes int8 with one scale per output row (symmetric,
absmax/127); activations stay in the model dtype. On CPU, torch's fused
`_weight_int8pack_mm` kernel reads the int8 weights directly, so batch-1 decode (bound by
memory bandwidth) moves a quarter of the fp32 bytes. Elsewhere the weight is dequantized
on the fly, which saves memory if not time.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LlamaError
from .model import Transformer
from .parallel import Collective, ParallelLinear, no_collective

QUANTIZE_MODES = ("int8", "q8_0", "q4_0", "q4_1")
FUSED_MAX_ROWS = 32  # decode steps up to this batch size use the fused int8 kernel (measured)


class Int8Linear(nn.Module):
    """y = combine(x @ (q * scale).T) with q int8 [out, in] and scale [out]; `combine` is the
    collective of the parallel layer this one replaces."""

    def __init__(self, weight: torch.Tensor, combine: Collective = no_collective):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.combine = combine
        # The fused kernel exists for CPU (and MPS) with half-precision activations.
        self.fused = weight.device.type in ("cpu", "mps") and weight.dtype in (torch.bfloat16, torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.fused and flat.shape[0] <= FUSED_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale).view(*x.shape[:-1], -1)
        else:
            # For many rows (prefill) the fused kernel is slower than dequantizing the weight
            # once and running the dtype's own matmul.
            out = F.linear(x, self.q.to(x.dtype)) * self.scale
        return self.combine(out)


def quantize_model(model: Transformer, mode: Optional[str]) -> Transformer:
    """Swap every projection (attention, feed-forward, output) to weight-only `mode`."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise LlamaError(f"quantize={mode!r} is not supported; use one of {', '.join(QUANTIZE_MODES)} or None")
    if mode != "int8":
        from .native.quantized_model import quantize_to_blocks

        return quantize_to_blocks(model, mode)
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, ParallelLinear)]
    for parent, name, child in swaps:
        # The int8 copy replaces the layer, whose weight is then freed.
        setattr(parent, name, Int8Linear(child.weight, child.combine))
    return model
