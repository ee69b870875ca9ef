"""Memory: what this rank's share of a model and its KV cache take, what the device has
free, and the check that refuses a build that cannot fit before anything is allocated."""

import os
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import LlamaError
from ..model.args import ModelArgs
from ..model.cache import kv_cache_dtype

GIB = 2**30
# The most tokens one prefill pass computes, padding included, unless one row's chunk is longer
# (llama.runtime.engine): what a build budgets activations for, whatever max_batch_size is. A
# pass with a prompt to score (echo, prompt logprobs) keeps logits for every token: it takes
# at most SCORED_TOKENS_PER_PASS.
PREFILL_TOKENS_PER_PASS = 4096
SCORED_TOKENS_PER_PASS = 1024


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


def activation_bytes(args: ModelArgs, mp: int, tokens: int, chunk: int = 512) -> int:
    """An upper bound of the memory a forward pass over `tokens` tokens takes beside the
    weights and caches: in a layer, the residual stream, the normed input and the attention
    output, the Q/K/V and their rotary copies, the feed-forward's three hidden-width tensors
    (each counted in fp32); and fp32 logits for the tokens of a scored pass, with one row's
    chunk of their log-softmax (a prompt's logprobs)."""
    q, kv, hidden = args.n_heads * args.head_dim // mp, args.kv_heads * args.head_dim // mp, args.ffn_hidden_dim // mp
    per_token = 4 * (4 * args.dim + 2 * (q + 2 * kv) + 3 * hidden)
    logits = (min(tokens, SCORED_TOKENS_PER_PASS) + min(tokens, chunk)) * 4 * args.vocab_size
    return tokens * per_token + logits


def pass_tokens(max_batch_size: int, max_seq_len: int, prefill_chunk: int = 512) -> int:
    """The most tokens one forward pass computes (see PREFILL_TOKENS_PER_PASS)."""
    return min(max(PREFILL_TOKENS_PER_PASS, prefill_chunk), max_batch_size * max_seq_len)


def device_memory(device: torch.device) -> Optional[Tuple[int, int]]:
    """(free, total) bytes of `device`: an accelerator's own figures; on the CPU this rank's share
    of the machine's available memory (available_memory) and of its total. None where unknown."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        return tuple(module.mem_get_info(device)) if hasattr(module, "mem_get_info") else None
    free, total = available_memory(device), _meminfo("MemTotal")
    if free is None or total is None:
        return None
    return free, total // _local_ranks()


def kv_cache_rows(args: ModelArgs, mp: int, device: torch.device, dtype: torch.dtype, max_batch_size: int,
                  max_seq_len: int, fraction: float) -> int:
    """How many cache rows of max_seq_len tokens (at most max_batch_size) fit in `fraction` of
    the device's memory beside what is in use (this rank's weights, once loaded, and whatever
    else the device holds) and the activations of the largest forward pass (vLLM's
    gpu_memory_utilization idea). A LlamaError with the numbers where not even one row fits."""
    known = device_memory(device)
    if known is None:
        raise LlamaError(f"gpu_memory_fraction: the memory of {device} is unknown here; give max_batch_size instead")
    free, total = known
    in_use = total - free
    activations = activation_bytes(args, mp, pass_tokens(max_batch_size, max_seq_len))
    room = int(fraction * total) - in_use - activations - rope_table_bytes(args, max_seq_len)
    per_row = kv_cache_bytes(args, 1, max_seq_len, mp, kv_cache_dtype(device, dtype))
    rows = min(max_batch_size, max(room, 0) // per_row)
    if rows < 1:
        raise LlamaError(
            f"gpu_memory_fraction={fraction} of {device}'s {total / GIB:.2f} GiB leaves no room for one KV cache "
            f"row of max_seq_len={max_seq_len} ({per_row / GIB:.3f} GiB): {in_use / GIB:.2f} GiB is in use (the "
            f"weights and anything else on the device) and a forward pass needs up to {activations / GIB:.2f} GiB; "
            f"raise gpu_memory_fraction, lower max_seq_len, or run more model-parallel processes")
    return rows


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process may still allocate on `device`; None where that is unknown.
    CPU: the kernel's MemAvailable (and the room left under a cgroup v2 limit), shared by
    the ranks on this machine (LOCAL_WORLD_SIZE); accelerators: the device's free memory."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        return module.mem_get_info(device)[0] if hasattr(module, "mem_get_info") else None
    known = [room for room in (_meminfo("MemAvailable"), _cgroup_room()) if room is not None]
    if not known:
        return None
    return min(known) // _local_ranks()


def _local_ranks() -> int:
    """The processes of this job on this machine (LOCAL_WORLD_SIZE), which share its memory."""
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1


def _meminfo(field: str) -> Optional[int]:
    """A /proc/meminfo field (MemAvailable, MemTotal) in bytes; None where it cannot be read."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
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
    activations = activation_bytes(args, mp, pass_tokens(max_batch_size, max_seq_len))
    if available is None or weights + caches + activations <= available:
        return
    sharing = os.environ.get("LOCAL_WORLD_SIZE", "1")
    where = f"{device}" + (f" (shared by {sharing} ranks on this machine)" if sharing not in ("", "1") else "")
    per_token = kv_cache_bytes(args, 1, 1, mp, cache_dtype)
    room = available - weights - rope_table_bytes(args, max_seq_len) - activations
    if room < per_token * max_batch_size * 2:
        advice = ("the weights and a forward pass leave no room: run more model-parallel processes, or choose a "
                  "smaller dtype (bf16 or fp16 take half of fp32)")
    else:
        tokens = room // per_token
        advice = (f"at most about {tokens} cached tokens fit (max_batch_size x max_seq_len), e.g. "
                  f"max_seq_len={min(max_seq_len, tokens // max_batch_size)} with "
                  f"max_batch_size={max_batch_size}, or max_batch_size={max(1, tokens // max_seq_len)} with "
                  f"max_seq_len={min(max_seq_len, tokens)}; lower --max_batch_size or --max_seq_len")
    raise LlamaError(f"not enough memory on {where} for this build: the weights ({dtype}, this rank's "
                     f"share) take {weights / GIB:.2f} GiB and the KV cache for max_batch_size="
                     f"{max_batch_size} x max_seq_len={max_seq_len} {caches / GIB:.2f} GiB, and a forward pass "
                     f"up to {activations / GIB:.2f} GiB, together {(weights + caches + activations) / GIB:.2f} "
                     f"GiB, but {available / GIB:.2f} GiB is available; {advice}")
