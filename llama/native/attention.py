"""A prompt's causal attention over its own keys on the native AVX512-BF16 kernel (prefill).

    out = causal_attention(q, k, v)    # q [B, S, H, D], k, v [B, S, K, D] bf16 -> [B, S, H, D]

is softmax(q k^T / sqrt(D)) v with query i seeing keys 0..i and query head h reading key/value
head h // (H / K), as `scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` on
the heads-first transposes. It takes the projections' own layout (tokens, then heads), so q,
k and v may be views of one fused product; scores and the output accumulate in fp32 and the
probabilities enter the second product in bf16 (csrc/attention_avx512_bf16.cpp). Whether it
runs instead of PyTorch's attention is decided by measurement (llama.runtime.backend).
"""

import math
from typing import Optional

import torch

from ..errors import LlamaError
from . import _lib, paths

PATH = "avx512_bf16"  # the code path it needs


def attention_problem(q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """Why causal_attention() cannot take q [B, S, H, D] and k [B, S, K, D] here, or None."""
    heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
    if PATH not in paths():
        return f"the native library's {PATH} path does not run here ({', '.join(paths()) or 'off'})"
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16:
        return f"q and k are {q.dtype} and {k.dtype} on {q.device}; the kernel takes bf16 on the CPU"
    if dim % 64 or dim > 256:
        return f"head_dim {dim} is not a multiple of 64 up to 256"
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    return None


def _dense_heads(t: torch.Tensor, name: str) -> torch.Tensor:
    """t itself where each token's heads are dense rows (a view of a fused product is), else a copy."""
    if t.dim() != 4:
        raise LlamaError(f"causal_attention(): {name} must be [B, S, heads, head_dim]; got {list(t.shape)}")
    if t.stride(3) == 1 and t.stride(2) == t.shape[3] and (t.shape[1] < 2 or t.stride(1) >= t.shape[2] * t.shape[3]):
        return t
    return t.contiguous()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int = 0) -> torch.Tensor:
    """q [B, S, H, D], k and v [B, S, K, D], bf16 on the CPU -> [B, S, H, D] bf16 (contiguous).
    threads: 0 for torch's thread team, 1 for the calling thread only."""
    problem = attention_problem(q, k)
    if problem is not None:
        raise LlamaError(f"causal_attention() cannot run: {problem}")
    q, k, v = _dense_heads(q, "q"), _dense_heads(k, "k"), _dense_heads(v, "v")
    batch, seqlen, heads, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != dim or v.dtype != torch.bfloat16:
        raise LlamaError(f"causal_attention(): k {list(k.shape)} and v {list(v.shape)} (bf16) must be "
                         f"[{batch}, {seqlen}, kv_heads, {dim}] for q {list(q.shape)}")
    out = torch.empty(batch, seqlen, heads, dim, dtype=torch.bfloat16)
    rc = _lib().llama_causal_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch, seqlen, heads, k.shape[2], dim,
            q.stride(1), k.stride(1), v.stride(1), q.stride(0), k.stride(0), v.stride(0), 1 / math.sqrt(dim), threads)
    if rc != 0:
        raise RuntimeError(f"native causal attention failed with code {rc}")
    return out
