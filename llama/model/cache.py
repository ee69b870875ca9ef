"""The KV cache: keys and values of every cached token, per layer, in static rows."""

from typing import Optional, Tuple

import torch
from torch import nn

from .. import settings

KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kv_cache_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache is kept in: LLAMA_KV_CACHE's (fp32 or bf16) where it is set, else
    fp32 on the CPU (it is small beside the weights at short contexts, and exact beside HF's
    fp32) and the model's dtype elsewhere. A bf16 cache halves the bytes a batch decode step
    reads at long contexts; its accuracy is measured in docs/native-kernels.md."""
    chosen = settings.get("LLAMA_KV_CACHE")
    if chosen != "auto":
        return KV_CACHE_DTYPES[chosen]
    return torch.float32 if device.type == "cpu" else model_dtype


def attention_dtype(device: torch.device, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype a decode step's attention runs in: fp32 on the CPU, whose PyTorch attention
    kernels are far slower in bf16 or fp16 for decode-sized inputs (a bf16 cache is widened as
    it is read); elsewhere the cache's."""
    return torch.float32 if device.type == "cpu" else cache_dtype


class KVCache(nn.Module):
    """Keys and values of one layer: k, v [rows, max_seq_len, K, D]. Each sequence owns a row
    (a scheduler assigns them); its token at position p is kept at index p of its row."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.attention_dtype = attention_dtype(device, dtype)
        self.writes = 0  # update() calls: the engine's prefix cache notices writes that are not its own

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: Optional[torch.Tensor] = None, fresh: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, S, K, D] at `positions` [B, S] of the cache rows `rows` [B] (default:
        rows 0..B-1); return those rows' first kv_len positions [B, L, K, D] in attention_dtype,
        as stored (a bf16 cache's keys rounded). fresh: every row starts at position 0 and
        L == S, so the keys are k and v themselves (no gather)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.writes += 1
        if rows is None:
            batch = k.shape[0]
            index = torch.arange(batch, device=k.device).unsqueeze(1)
            self.k[index, positions] = k
            self.v[index, positions] = v
            keys, values = self.k[:batch, :kv_len], self.v[:batch, :kv_len]
        else:
            index = rows.unsqueeze(1)
            self.k[index, positions] = k
            self.v[index, positions] = v
            # else a gather: a copy of those rows
            keys, values = (k, v) if fresh else (self.k[rows, :kv_len], self.v[rows, :kv_len])
        return keys.to(self.attention_dtype), values.to(self.attention_dtype)
