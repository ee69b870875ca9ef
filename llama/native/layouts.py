"""Weight layouts of the native kernels, and their pure-PyTorch quantizers.

A weight W [N, K] (N output features, K input features, K a multiple of 32) is stored as:

    "f32"   float32 [N, K]
    "bf16"  bfloat16 [N, K]
    "q8_0"  uint8 [N, K/32 * 34]  blocks of fp16 d + int8 q[32]           w = q * d
    "q4_0"  uint8 [N, K/32 * 18]  blocks of fp16 d + 16 bytes of nibbles   w = (q - 8) * d
    "q4_1"  uint8 [N, K/32 * 20]  blocks of fp16 d, fp16 m + 16 bytes     w = q * d + m

The quantized layouts are GGML's block formats byte for byte (as in GGUF files): byte j of
a block's nibbles holds element j in its low nibble and element j + 16 in its high nibble.
The functions here are the fallback when the native library is not built; they round
exactly as ggml-quants.c and the gguf package do.

    "q8_0x16", "q4_0x16", "q4_1x16"   the same blocks, reordered at load 16 rows at a time
                                      for the AVX-512 kernels (csrc/common.h); N % 16 == 0.
                                      Made and undone by llama.native.interleave(); kept in
                                      memory only, never saved (state_dict gives the blocks).
"""

from typing import Dict, Tuple

import torch

from ..errors import LlamaError

BLOCK = 32  # weights per block
BLOCK_BYTES: Dict[str, int] = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FLOAT_LAYOUTS: Dict[str, torch.dtype] = {"f32": torch.float32, "bf16": torch.bfloat16}
INTERLEAVED: Dict[str, str] = {"q8_0": "q8_0x16", "q4_0": "q4_0x16", "q4_1": "q4_1x16"}
GROUP_ROWS = 16  # rows of an interleaved group
LAYOUTS: Tuple[str, ...] = ("f32", "bf16", "q8_0", "q4_0", "q4_1", *INTERLEAVED.values())
LAYOUT_IDS: Dict[str, int] = {name: i for i, name in enumerate(LAYOUTS)}  # as in csrc/common.h
_BASE: Dict[str, str] = {interleaved: base for base, interleaved in INTERLEAVED.items()}

_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries of the PyTorch quantizers


def check_layout(layout: str) -> None:
    if layout not in LAYOUT_IDS:
        raise LlamaError(f"layout={layout!r} is not a weight layout; use one of {', '.join(LAYOUTS)}")


def base_layout(layout: str) -> str:
    """The block format of a layout ("q4_0" for "q4_0x16")."""
    return _BASE.get(layout, layout)


def is_interleaved(layout: str) -> bool:
    return layout in _BASE


def is_quantized(layout: str) -> bool:
    return base_layout(layout) in BLOCK_BYTES


def packed_shape(layout: str, n: int, k: int) -> Tuple[int, int]:
    """Shape of the stored weight of an [n, k] matrix."""
    check_layout(layout)
    if k % BLOCK:
        raise LlamaError(f"in_features={k} is not a multiple of {BLOCK}, which layout {layout!r} needs")
    if is_interleaved(layout) and n % GROUP_ROWS:
        raise LlamaError(f"out_features={n} is not a multiple of {GROUP_ROWS}, which layout {layout!r} needs")
    return (n, k // BLOCK * BLOCK_BYTES[base_layout(layout)]) if is_quantized(layout) else (n, k)


def in_features(layout: str, packed: torch.Tensor) -> int:
    """K of a stored weight."""
    if not is_quantized(layout):
        return packed.shape[-1]
    size = BLOCK_BYTES[base_layout(layout)]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % size or \
            (is_interleaved(layout) and packed.shape[0] % GROUP_ROWS):
        rows = f"N a multiple of {GROUP_ROWS}, " if is_interleaved(layout) else ""
        raise LlamaError(f"a {layout} weight must be uint8 [N, K/32*{size}] ({rows}K a multiple of {BLOCK}); "
                         f"got {packed.dtype} {list(packed.shape)}")
    return packed.shape[1] // size * BLOCK


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """roundf(): halves away from zero, computed as the gguf package does."""
    a = v.abs()
    f = a.floor()
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[B, 1] fp32 -> [B, 2] little-endian fp16 bytes."""
    return v.to(torch.float16).view(torch.uint8)


def _quantize_blocks(blocks: torch.Tensor, layout: str) -> torch.Tensor:
    """fp32 [B, 32] -> uint8 [B, block bytes]."""
    inv = lambda d: torch.where(d == 0, torch.zeros_like(d), 1 / d)  # noqa: E731
    if layout == "q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = _round_away(blocks * inv(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1)
    if layout == "q4_0":
        extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed, largest |x|
        d = extreme / -8
        q = torch.trunc(blocks * inv(d) + 8.5).clamp(0, 15).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], dim=1)
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (high - low) / 15
    q = torch.trunc((blocks - low) * inv(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), q[:, :16] | (q[:, 16:] << 4)], dim=1)


def _dequantize_blocks(raw: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 [B, block bytes] -> fp32 [B, 32]."""
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    if layout == "q8_0":
        return raw[:, 2:].contiguous().view(torch.int8).float() * d
    start = 4 if layout == "q4_1" else 2
    nibbles = raw[:, start:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=1).float()
    if layout == "q4_0":
        return (q - 8) * d
    return q * d + raw[:, 2:4].contiguous().view(torch.float16).float()


def torch_quantize(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """[N, K] float -> stored blocks [N, K/32 * block bytes] (uint8), in PyTorch."""
    n, k = weight.shape
    out = torch.empty(packed_shape(layout, n, k), dtype=torch.uint8, device=weight.device)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // k)
    for r in range(0, n, step):
        blocks = weight[r:r + step].float().reshape(-1, BLOCK)
        out[r:r + step] = _quantize_blocks(blocks, layout).reshape(-1, out.shape[1])
    return out


def torch_dequantize(packed: torch.Tensor, layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored blocks [N, K/32 * block bytes] -> [N, K] in `dtype`, in PyTorch."""
    k = in_features(layout, packed)
    n = packed.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // k)
    for r in range(0, n, step):
        raw = packed[r:r + step].reshape(-1, BLOCK_BYTES[layout])
        out[r:r + step] = _dequantize_blocks(raw, layout).reshape(-1, k).to(dtype)
    return out
