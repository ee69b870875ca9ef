"""int8 weights: each weight becomes int8 with one scale per output row (symmetric,
absmax/127); activations stay in the model dtype. Decode-sized inputs run torch's fused
`_weight_int8pack_mm` kernel, which reads the int8 weights directly, so batch-1 decode
(bound by memory bandwidth) moves half the bytes of bf16; on the CPU it exists in every
torch build, on an accelerator only in some torch versions, and quantizing is refused on a
device without it (dequantizing every weight at every step would be slower than not
quantizing). Quantizing one weight holds its int8 copy and a bounded fp32 block of rows.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LlamaError

FUSED_MAX_ROWS = 32  # decode steps up to this batch size use the fused int8 kernel
BLOCK_BYTES = 16 * 2**20  # the fp32 temporaries of quantizing one weight: one block of rows at a time
HALF_DTYPES = (torch.bfloat16, torch.float16)


def quantize_rows(weight: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> tuple:
    """(q int8 [out, in], scale [out] in weight's dtype) with q * scale ~ weight: symmetric,
    scale = absmax/127 per row. Works through `block_bytes` of fp32 rows at a time, so the
    temporaries stay that size whatever the weight's (the output layer of Llama 3 8B would
    otherwise need three 2 GB fp32 copies)."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, block_bytes // (4 * cols))
    for start in range(0, rows, step):
        block = weight[start:start + step].to(torch.float32, copy=True)  # never the weight itself, in place
        low, high = torch.aminmax(block, dim=1)
        block_scale = (torch.maximum(-low, high) / 127).clamp_(min=1e-12)
        q[start:start + step] = block.div_(block_scale[:, None]).round_().clamp_(-127, 127)
        scale[start:start + step] = block_scale
    return q, scale.to(weight.dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 [out, in] and scale [out]: a parallel layer's product
    (its collective stays the layer's)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.fused = weight.dtype in HALF_DTYPES and has_int8_kernel(weight.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.fused and flat.shape[0] <= FUSED_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale).view(*x.shape[:-1], -1)
        else:
            # For many rows (prefill) the fused kernel is slower than dequantizing the weight
            # once and running the dtype's own matmul.
            out = F.linear(x, self.q.to(x.dtype)) * self.scale
        return out


def has_int8_kernel(device_type: str) -> bool:
    """Whether this torch build has the fused int8 matmul for `device_type` (CPU: always)."""
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    try:  # the dispatch keys are the device types in capitals: CPU, MPS, ...
        return has_kernel is not None and has_kernel("aten::_weight_int8pack_mm", device_type.upper())
    except RuntimeError:  # no such dispatch key
        return False


def check_int8_device(device: torch.device, dtype: torch.dtype) -> None:
    """LlamaError unless int8 runs well on `device`: on an accelerator it needs the fused
    kernel and half-precision activations (without them every step would dequantize every
    weight, slower than the unquantized model)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        raise LlamaError("quantize='int8' on CUDA is refused: its kernel decodes slower than bf16 there (131 vs 223 "
                         "tokens/s at batch 1 on an H200, benchmarks/results/gpu-h200/gpu_check.json), so it would "
                         "only save memory; leave --quantize out (bf16), or run more model-parallel processes to fit")
    if not has_int8_kernel(device.type):
        raise LlamaError(f"quantize='int8' is not available on {device.type} with torch {torch.__version__}: it "
                         f"lacks an int8 matmul kernel for that device (aten::_weight_int8pack_mm); leave "
                         f"--quantize out (the default half precision), or run a torch build that has one")
    if dtype not in HALF_DTYPES:
        raise LlamaError(f"quantize='int8' on {device.type} runs with bf16 or fp16 activations, not {dtype}; "
                         f"pass dtype='bf16' or 'fp16' (or leave dtype out)")
