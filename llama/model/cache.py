"""The KV cache: keys and values of every cached token, per layer, in static rows."""

from typing import Optional, Tuple

import torch
from torch import nn


def kv_cache_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the KV cache, and so of attention. PyTorch's CPU attention kernels are
    far slower in bf16/fp16 than in fp32 for decode-sized inputs, so on the CPU the cache
    stays in fp32 (it is small beside the weights there); elsewhere it follows the model."""
    return torch.float32 if device.type == "cpu" else model_dtype


class KVCache(nn.Module):
    """Keys and values of one layer: k, v [rows, max_seq_len, K, D]. Each sequence owns a row
    (a scheduler assigns them); its token at position p is kept at index p of its row."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.writes = 0  # update() calls: the engine's prefix cache notices writes that are not its own

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: Optional[torch.Tensor] = None, fresh: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, S, K, D] at `positions` [B, S] of the cache rows `rows` [B] (default:
        rows 0..B-1); return those rows' first kv_len positions [B, L, K, D]. fresh: every row
        starts at position 0 and L == S, so the keys are k and v themselves (no gather)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.writes += 1
        if rows is None:
            batch = k.shape[0]
            index = torch.arange(batch, device=k.device).unsqueeze(1)
            self.k[index, positions] = k
            self.v[index, positions] = v
            return self.k[:batch, :kv_len], self.v[:batch, :kv_len]
        index = rows.unsqueeze(1)
        self.k[index, positions] = k
        self.v[index, positions] = v
        if fresh:
            return k, v
        return self.k[rows, :kv_len], self.v[rows, :kv_len]  # a gather: a copy of those rows
