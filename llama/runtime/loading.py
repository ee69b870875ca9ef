"""Checkpoint -> model on this rank, in one place: the checks that run before anything is
allocated (divisibility, the shards against params.json, memory), the model built on the
meta device and given this rank's weights, quantization, the caches. `Llama.build` is a
thin wrapper over `load`.

A failure that one rank sees ends every rank with its message: each stage ends in one
agreement among the ranks (all_ranks_agree), never one inside another.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..chat_format import ChatFormat, make_chat_format
from ..checkpoint import (
    check_divisible,
    check_shards,
    find_shards,
    load_params,
    load_rank_state_dict,
    open_shards,
    shards_for_rank,
    vocab_parallel_embedding,
)
from ..errors import LlamaError
from ..model import ModelArgs, Transformer
from ..model.cache import kv_cache_dtype
from ..model.quantize import quantize_model
from ..tokenizer import Tokenizer, load_tokenizer
from ..utils.checks import real_number, whole_number
from ..utils.ranks import print0, silence_non_main_ranks
from .devices import resolve_dtype
from .distributed import DistContext, all_ranks_agree, empty_device_cache, init_distributed, smallest_over_ranks
from .memory import GIB, check_memory, kv_cache_bytes, kv_cache_rows, rank_weight_bytes

# A slow network filesystem: what a build's wait for the slowest rank allows for reading.
SLOW_READ_BYTES_PER_S = 25e6


@dataclass
class Loaded:
    """What a build makes: this rank's model, the tokenizer, the chat format (from
    params.json's chat_format and default_system_prompt, else the tokenizer's), and the
    process-group context."""
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat
    ctx: DistContext


def load(ckpt_dir: str, tokenizer_path: Optional[str] = None, *, max_seq_len: int = 512, max_batch_size: int = 4,
         model_parallel_size: Optional[int] = None, seed: int = 1, device: Union[str, torch.device, None] = None,
         dtype: Union[str, torch.dtype, None] = None, quantize: Optional[str] = None,
         gpu_memory_fraction: Optional[float] = None) -> Loaded:
    """Load a Meta-layout checkpoint onto this process's share of the model (the arguments
    are Llama.build's)."""
    max_seq_len = whole_number(max_seq_len, "max_seq_len", low=2)
    max_batch_size = whole_number(max_batch_size, "max_batch_size", low=1)
    if gpu_memory_fraction is not None:
        gpu_memory_fraction = real_number(gpu_memory_fraction, "gpu_memory_fraction", low=0, high=1, above=True)
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
        # With gpu_memory_fraction the cache takes what is left once the weights are in: one row must fit.
        check_memory(args, ctx.model_parallel_size, ctx.device, dtype,
                     1 if gpu_memory_fraction is not None else max_batch_size, max_seq_len)
    # Ranks read their weights at their own disks' speed: the first to finish wait for the
    # last up to LLAMA_DIST_TIMEOUT plus the time a slow disk needs for one rank's share.
    with all_ranks_agree("building the model", work_s=rank_weight_bytes(args, ctx.model_parallel_size, dtype)
                         / SLOW_READ_BYTES_PER_S):
        model = model_on_device(args, shards, states, ctx, dtype, quantize, max_batch_size, max_seq_len,
                                gpu_memory_fraction)
    if gpu_memory_fraction is not None:
        rows = smallest_over_ranks(args.max_batch_size)  # the ranks' caches must have the same rows
        if rows < args.max_batch_size:
            with all_ranks_agree("allocating the KV cache"):
                setup_caches(model, rows, max_seq_len, ctx.device)
        size = kv_cache_bytes(args, rows, max_seq_len, ctx.model_parallel_size, kv_cache_dtype(ctx.device, dtype))
        print0(f"KV cache: {rows} rows (max_batch_size) x max_seq_len={max_seq_len}, {size / GIB:.2f} GiB per "
               f"rank, within gpu_memory_fraction={gpu_memory_fraction} of {ctx.device}'s memory")
    print0(f"Loaded in {time.time() - start:.2f} seconds")
    return Loaded(model, tokenizer, chat_format, ctx)


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
                    max_seq_len: int, gpu_memory_fraction: Optional[float] = None) -> Transformer:
    """build_model, quantization and caches: what a build allocates. Everything it made stays
    in its frames (none in the caller's) when it fails, so all_ranks_agree can free it.
    Empties `states` once the model holds what it uses of the memory-mapped shards."""
    model = build_model(args, shards, states, ctx, dtype)
    states.clear()
    quantize_model(model, quantize)
    if ctx.device.type == "cuda":  # fewer, larger kernels; on the CPU the native decode step reads each weight
        model.fuse_projections()
    if gpu_memory_fraction is not None:  # as many rows as fit, at most max_batch_size
        empty_device_cache()  # memory the allocator keeps counts as used
        max_batch_size = kv_cache_rows(args, ctx.model_parallel_size, ctx.device, dtype, max_batch_size, max_seq_len,
                                       gpu_memory_fraction)
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
                         f"{max_batch_size} x max_seq_len={max_seq_len} needs {need / GIB:.2f} GiB "
                         f"beside the weights; lower --max_batch_size or --max_seq_len") from None
