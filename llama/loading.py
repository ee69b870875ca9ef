"""Checkpoint -> model on this device, in one place: the dtype policy, the checks that run
before anything is allocated (divisibility, the shards against params.json, memory), the
model built on the meta device and given this rank's weights, quantization, the caches.
`Llama.build` is a thin wrapper over `load`.

A failure that one rank sees ends every rank with its message: each stage ends in one
agreement among the ranks (all_ranks_agree), never one inside another.
"""

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from .chat_format import ChatFormat, make_chat_format
from .checkpoint import (check_shards, find_shards, load_params, load_rank_state_dict, open_shards,
                         shards_for_rank, vocab_parallel_embedding)
from .distributed import DistContext, all_ranks_agree, init_distributed, print0, silence_non_main_ranks
from .errors import LlamaError
from .model import ModelArgs, Transformer, kv_cache_dtype
from .quantize import quantize_model
from .tokenizer import Tokenizer, load_tokenizer

_GIB = 2**30
# A slow network filesystem: what a build's wait for the slowest rank allows for reading.
SLOW_READ_BYTES_PER_S = 25e6

# The weight dtypes the engine runs and writes (llama.convert --dtype too), by short name.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    """What a build makes: this rank's model, the tokenizer, the chat format (from
    params.json's chat_format and default_system_prompt, else the tokenizer's), and the
    process-group context."""
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat
    ctx: DistContext


def load(ckpt_dir: str, tokenizer_path: Optional[str], max_seq_len: int, max_batch_size: int,
         model_parallel_size: Optional[int], seed: int, device: Union[str, torch.device, None],
         dtype: Union[str, torch.dtype, None], quantize: Optional[str]) -> Loaded:
    """Load a Meta-layout checkpoint onto this process's share of the model (see Llama.build)."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise LlamaError(f"max_seq_len={max_seq_len!r} must be an integer of at least 2")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise LlamaError(f"max_batch_size={max_batch_size!r} must be a positive integer")
    start = time.time()
    ctx = init_distributed(model_parallel_size, device, seed)
    silence_non_main_ranks()
    with all_ranks_agree("loading the checkpoint"):
        # Everything here reads metadata only: nothing is allocated until it all fits.
        shards = find_shards(ckpt_dir)
        params = load_params(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else ckpt_dir)
        chat_format = make_chat_format(tokenizer, params.get("chat_format"), params.get("default_system_prompt"),
                                       where=str(Path(ckpt_dir) / "params.json"))
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size <= 0:
            args.vocab_size = tokenizer.n_words
        if tokenizer.n_words != args.vocab_size:
            raise LlamaError(f"tokenizer {tokenizer_path or ckpt_dir!r} has {tokenizer.n_words} tokens but the "
                             f"model in {ckpt_dir!r} has vocab_size {args.vocab_size}; use the tokenizer that "
                             f"came with this checkpoint")
        check_divisible(args, ctx.model_parallel_size)
        states = open_shards(shards, shards_for_rank(len(shards), ctx.model_parallel_rank, ctx.model_parallel_size))
        check_shards(shards, states, args)
        dtype = resolve_dtype(dtype, ctx.device)
        check_memory(args, ctx.model_parallel_size, ctx.device, dtype, max_batch_size, max_seq_len)
    # Ranks read their weights at their own disks' speed: the first to finish wait for the
    # last up to LLAMA_DIST_TIMEOUT plus the time a slow disk needs for one rank's share.
    with all_ranks_agree("building the model", work_s=rank_weight_bytes(args, ctx.model_parallel_size, dtype)
                         / SLOW_READ_BYTES_PER_S):
        model = model_on_device(args, shards, states, ctx, dtype, quantize, max_batch_size, max_seq_len)
    print0(f"Loaded in {time.time() - start:.2f} seconds")
    return Loaded(model, tokenizer, chat_format, ctx)


# ---- dtypes --------------------------------------------------------------------------------

def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (x86 AVX512-BF16/AMX, ARM BF16), where bf16 halves
    the memory traffic of decoding at little cost; elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators: bf16 where the device computes in it natively, else
    fp16; bf16 on CPUs with native bf16, fp32 on other CPUs."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if accelerator_has_native_bf16(device) else torch.float16


def accelerator_has_native_bf16(device: torch.device) -> bool:
    """Whether `device` (the current device of its type: init_distributed made it so) runs
    bf16 in hardware. torch's is_bf16_supported() also says yes where bf16 is only emulated
    through fp32 (CUDA GPUs before sm80: V100, T4), far slower there than fp16, unless asked
    with including_emulation=False; a device module whose query lacks that argument answers
    for itself."""
    module = getattr(torch, device.type, None)
    query = getattr(module, "is_bf16_supported", None)
    if query is None:
        return False
    try:
        return bool(query(including_emulation=False))
    except TypeError:
        return bool(query())


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The model dtype: `dtype` (a DTYPES name, torch's name for it, or the torch dtype),
    else $LLAMA_DTYPE, else default_dtype(device)."""
    if dtype is None:
        dtype = os.environ.get("LLAMA_DTYPE") or None  # a default for scripts that pass none
    if dtype is None:
        return default_dtype(device)
    chosen = (DTYPES.get(dtype) or getattr(torch, dtype, None)) if isinstance(dtype, str) else dtype
    if not isinstance(chosen, torch.dtype) or chosen not in DTYPES.values():
        raise LlamaError(f"dtype={dtype!r} (or LLAMA_DTYPE) is not supported; use one of fp32, bf16, fp16")
    return chosen


# ---- checks before allocation ---------------------------------------------------------------

def check_divisible(args: ModelArgs, mp: int) -> None:
    """Every split dimension must divide by the model-parallel size."""
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim,
             "vocab_size": args.vocab_size, "feed-forward hidden size": args.ffn_hidden_dim}
    bad = [f"{name}={value}" for name, value in sizes.items() if value % mp]
    if bad:
        raise LlamaError(f"this model cannot be split over {mp} model-parallel ranks: "
                         f"{', '.join(bad)} not divisible by {mp}; run with fewer processes "
                         f"(a divisor of n_kv_heads={args.kv_heads})")


# ---- memory ------------------------------------------------------------------------------

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
        advice = (f"the weights alone leave no room: run more model-parallel processes, or choose a "
                  f"smaller dtype (bf16 or fp16 take half of fp32)")
    else:
        tokens = room // per_token
        advice = (f"at most about {tokens} cached tokens fit (max_batch_size x max_seq_len), e.g. "
                  f"max_seq_len={min(max_seq_len, tokens // max_batch_size)} with "
                  f"max_batch_size={max_batch_size}, or max_batch_size={max(1, tokens // max_seq_len)} with "
                  f"max_seq_len={min(max_seq_len, tokens)}; lower --max_batch_size or --max_seq_len")
    raise LlamaError(f"not enough memory on {where} for this build: the weights ({dtype}, this rank's "
                     f"share) take {weights / _GIB:.2f} GiB and the KV cache for max_batch_size="
                     f"{max_batch_size} x max_seq_len={max_seq_len} {caches / _GIB:.2f} GiB, together "
                     f"{(weights + caches) / _GIB:.2f} GiB, but {available / _GIB:.2f} GiB is available; {advice}")


# ---- the model -----------------------------------------------------------------------------

def build_model(args: ModelArgs, shards: List[Path], states: Dict[int, Dict[str, torch.Tensor]],
                ctx: DistContext, dtype: torch.dtype) -> Transformer:
    """This rank's share of the model: built on the meta device (nothing allocated), then
    given the weights from the opened shards `states`, which stay memory-mapped or are
    copied once straight into place."""
    rank, size = ctx.model_parallel_rank, ctx.model_parallel_size
    vocab_parallel = vocab_parallel_embedding(states, len(shards), args.dim)
    with torch.device("meta"):
        model = Transformer(args, vocab_parallel)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = load_rank_state_dict(shards, states, expected, rank, size, ctx.device, dtype, vocab_parallel)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def model_on_device(args: ModelArgs, shards: List[Path], states: Dict[int, Dict[str, torch.Tensor]],
                    ctx: DistContext, dtype: torch.dtype, quantize: Optional[str], max_batch_size: int,
                    max_seq_len: int) -> Transformer:
    """build_model, quantization and caches: what a build allocates. Everything it made stays
    in its frames (none in the caller's) when it fails, so all_ranks_agree can free it.
    Empties `states` once the model holds what it uses of the memory-mapped shards."""
    model = build_model(args, shards, states, ctx, dtype)
    states.clear()
    quantize_model(model, quantize)
    setup_caches(model, max_batch_size, max_seq_len, ctx.device)
    return model


def setup_caches(model: Transformer, max_batch_size: int, max_seq_len: int, device: torch.device) -> None:
    """The model's KV caches and rotary table; an allocation failure (check_memory estimated
    too little, or memory went elsewhere meanwhile) is a LlamaError with the numbers."""
    try:
        model.setup_caches(max_batch_size, max_seq_len)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "memory" not in str(exc).lower():
            raise
        mp = max(1, model.params.kv_heads // model.layers[0].attention.n_local_kv_heads)
        need = kv_cache_bytes(model.params, max_batch_size, max_seq_len, mp,
                              kv_cache_dtype(device, model.norm.weight.dtype))
        raise LlamaError(f"out of memory on {device} allocating the KV cache: max_batch_size="
                         f"{max_batch_size} x max_seq_len={max_seq_len} needs {need / _GIB:.2f} GiB "
                         f"beside the weights; lower --max_batch_size or --max_seq_len") from None
