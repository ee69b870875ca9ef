"""Memory: what this rank's share of a model and its KV cache take, what the device has
free, and the check that refuses a build that cannot fit before anything is allocated."""

import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import LlamaError
from ..model.args import ModelArgs
from ..model.cache import kv_cache_dtype

GIB = 2**30


def rank_weight_bytes(args: ModelArgs, mp: int, dtype: torch.dtype) -> int:
    """Bytes of one model-parallel rank's share of the weights in `dtype` (norms replicated)."""
    kv, hidden = args.kv_heads * args.head_dim, args.ffn_hidden_dim
    split = args.n_layers * (2 * args.dim * args.dim + 2 * kv * args.dim + 3 * args.dim * hidden)
    split += 2 * args.vocab_size * args.dim  # embedding and output
    replicated = (2 * args.n_layers + 1) * args.dim
    return (split // mp + replicated) * dtype.itemsize


def kv_cache_bytes(args: ModelArgs, max_batch_size: int, max_seq_len: int, mp: int,
                   dtype: torch.dtype) -> int:
    """Memory the KV caches of one rank take: keys and values for every layer."""
    per_token = 2 * args.n_layers * (args.kv_heads // mp) * args.head_dim
    return per_token * max_batch_size * max_seq_len * dtype.itemsize


def rope_table_bytes(args: ModelArgs, max_seq_len: int) -> int:
    """The rotary table: one complex64 per position and pair of head dims."""
    return max_seq_len * (args.head_dim // 2) * 8


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process may still allocate on `device`; None where that is unknown.
    CPU: the kernel's MemAvailable (and the room left under a cgroup v2 limit), shared by
    the ranks on this machine (LOCAL_WORLD_SIZE); accelerators: the device's free memory."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        return module.mem_get_info(device)[0] if hasattr(module, "mem_get_info") else None
    known = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    if not known:
        return None
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return min(known) // (int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1)


def _meminfo_available() -> Optional[int]:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _cgroup_room() -> Optional[int]:
    """memory.max - memory.current of this process's cgroup (v2); None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    return int(limit) - int(used) if limit.isdigit() and used.isdigit() else None


def check_memory(args: ModelArgs, mp: int, device: torch.device, dtype: torch.dtype,
                 max_batch_size: int, max_seq_len: int) -> None:
    """LlamaError with the numbers, and what would fit, unless this rank's weights and
    caches fit the memory available on `device`. Runs before anything is allocated, so a
    build that cannot fit is refused instead of killed by the out-of-memory killer."""
    available = available_memory(device)
    cache_dtype = kv_cache_dtype(device, dtype)
    weights = rank_weight_bytes(args, mp, dtype)
    caches = kv_cache_bytes(args, max_batch_size, max_seq_len, mp, cache_dtype) + rope_table_bytes(args, max_seq_len)
    if available is None or weights + caches <= available:
        return
    sharing = os.environ.get("LOCAL_WORLD_SIZE", "1")
    where = f"{device}" + (f" (shared by {sharing} ranks on this machine)" if sharing not in ("", "1") else "")
    per_token = kv_cache_bytes(args, 1, 1, mp, cache_dtype)
    room = available - weights - rope_table_bytes(args, max_seq_len)
    if room < per_token * max_batch_size * 2:
        advice = ("the weights alone leave no room: run more model-parallel processes, or choose a "
                  "smaller dtype (bf16 or fp16 take half of fp32)")
    else:
        tokens = room // per_token
        advice = (f"at most about {tokens} cached tokens fit (max_batch_size x max_seq_len), e.g. "
                  f"max_seq_len={min(max_seq_len, tokens // max_batch_size)} with "
                  f"max_batch_size={max_batch_size}, or max_batch_size={max(1, tokens // max_seq_len)} with "
                  f"max_seq_len={min(max_seq_len, tokens)}; lower --max_batch_size or --max_seq_len")
    raise LlamaError(f"not enough memory on {where} for this build: the weights ({dtype}, this rank's "
                     f"share) take {weights / GIB:.2f} GiB and the KV cache for max_batch_size="
                     f"{max_batch_size} x max_seq_len={max_seq_len} {caches / GIB:.2f} GiB, together "
                     f"{(weights + caches) / GIB:.2f} GiB, but {available / GIB:.2f} GiB is available; {advice}")
