"""How the model's matmuls run on this machine: the kernel policy, applied from outside the
model around each forward pass (by the decode loop), never by flags flipped inside it.

For PyTorch's kernels, one rule measured on this project's AVX512-BF16 CPU: for a single row
(batch-1 decode), PyTorch's plain CPU kernels read bf16 weights about twice as fast as
oneDNN's, whose fixed cost pays off only from two rows up.

For the decode step as a whole, decode_step() picks PyTorch (eager, with that rule) or the
native step (llama.native.decode: one call per step) on one of its code paths (AMX or
AVX512-BF16 for bf16 weights) by timing real steps of the model on this machine, once per
machine kind, software and model shape (cached under LLAMA_CACHE).

For a prompt's attention over its own keys, prompt_attention_dtype() picks the KV cache's fp32
or the model's bf16/fp16 by timing PyTorch's attention in both (once per model and caches).
"""

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .errors import LlamaError
from .model import Transformer


@contextlib.contextmanager
def matmul_policy(tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, the kernels best for a forward pass over `tokens` [B, S]."""
    if not (tokens.numel() == 1 and tokens.device.type == "cpu"):
        yield
        return
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # plain kernels for the single row
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


# ---- a prompt's attention: in the KV cache's fp32 or the model's dtype, by measurement ---------

PROMPT_TOKENS_TIMED = 256
PROMPT_ATTENTION_MARGIN = 0.8  # the model's dtype must be this much faster: no flip-flop near a tie


def prompt_attention_dtype(model: Transformer) -> Optional[torch.dtype]:
    """The dtype for a prompt's attention over its own keys, where the KV cache is kept in
    another dtype than the model's (fp32 on the CPU, see model.kv_cache_dtype): the model's
    (bf16, fp16) where PyTorch's CPU flash attention ran a 256-token prompt faster in it on
    this machine, else None (the cache's). Measured once per machine, software and head shape
    and kept in $LLAMA_CACHE/tune/prompt-attention.json, so that every process here makes the
    same choice (a server and a script, the ranks of a job, agree to the last bit). On an Intel
    Xeon with AMX: bf16 2.8x faster at 512 tokens (0.94 against 2.68 ms a layer of
    SmolLM2-135M), which made prefill 0.59x of HF's before. Decode steps keep the cache's
    dtype: bf16 is slower for one query."""
    attention = model.layers[0].attention
    cache_dtype, model_dtype = attention.cache.k.dtype, model.norm.weight.dtype
    if attention.cache.k.device.type != "cpu" or model_dtype == cache_dtype:
        return None
    shape = (attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim)

    def measure(_) -> dict:
        ms = {str(d).replace("torch.", ""): 1e3 * time_prompt_attention(d, *shape) for d in (model_dtype, cache_dtype)}
        model_ms, cache_ms = ms.values()
        return {"ms": ms, "model_dtype": model_ms < PROMPT_ATTENTION_MARGIN * cache_ms}

    entry = kept_verdicts(_prompt_verdict_file(), {"": prompt_attention_key(model_dtype, cache_dtype, shape)},
                          measure, "the prompt-attention measurement")[""]
    return model_dtype if entry["model_dtype"] else None


def prompt_attention_key(model_dtype: torch.dtype, cache_dtype: torch.dtype, shape: Sequence[int]) -> dict:
    """What the prompt-attention verdict depends on: machine, software, heads, dtypes, threads."""
    return {**machine_key_fields(), "heads": list(shape), "dtypes": [str(model_dtype), str(cache_dtype)]}


def machine_key_fields() -> Dict[str, object]:
    """The fields of every measured verdict's key that name the machine and software."""
    from .native.cpu import cpu_flags, cpu_model

    return {"cpu": cpu_model(), "flags": " ".join(cpu_flags()), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def kept_verdicts(path: Path, keys: Dict[object, dict], measure: Callable[[object], dict],
                  what: str) -> Dict[object, dict]:
    """For each item of `keys` (item -> the key its verdict depends on), the entry kept in
    `path`: measure(item) -> entry fields for those not kept yet, and kept. One process measures
    at a time (the ranks of a job start together): the others read its verdicts instead of
    timing beside it, and all choose alike. No collective may run inside measure(): a rank
    waiting on the lock would stall the one holding it."""
    from .locking import hold
    from .native.tune import read_cache, write_entries

    names = {item: (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key)
             for item, key in keys.items()}
    entries = read_cache(path).get("entries", {})
    if any(name not in entries for name, _ in names.values()):
        with hold(path, what, quiet=True):
            entries = read_cache(path).get("entries", {})
            new = {name: {"key": key, **measure(item)} for item, (name, key) in names.items() if name not in entries}
            if new:
                write_entries(new, path)
                entries.update(new)
    return {item: entries[name] for item, (name, _) in names.items()}


def _prompt_verdict_file() -> Path:
    from .assets import cache_dir

    return cache_dir() / "tune" / "prompt-attention.json"


def time_prompt_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> float:
    """Seconds of one causal attention of a PROMPT_TOKENS_TIMED-token prompt: the best of 10."""
    from .native.tune import best_time

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, PROMPT_TOKENS_TIMED, head_dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, PROMPT_TOKENS_TIMED, head_dim, generator=g).to(dtype)
    return best_time([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                               enable_gqa=True)], 10)


# ---- the decode step: PyTorch or the native step, chosen by measurement ----------------------

DECODE_BACKENDS = ("torch", "native")
_MEASURED_STEPS = 5  # timed decode steps per backend and batch size (after 2 unmeasured ones)
NATIVE_SETTINGS = {"0": "PyTorch only", "1": "the native step wherever it runs", "auto": "measured"}


def native_setting() -> str:
    """LLAMA_NATIVE: "0" (native kernels off), "1" (the native decode step wherever it can
    run, unmeasured) or "auto" (the default: the faster by measurement)."""
    value = os.environ.get("LLAMA_NATIVE", "auto").strip().lower() or "auto"
    if value not in NATIVE_SETTINGS:
        choices = "; ".join(f"{k}: {v}" for k, v in NATIVE_SETTINGS.items())
        raise LlamaError(f"LLAMA_NATIVE={value!r} is not a setting ({choices}); set one of these or unset it")
    return value


def native_problem(model: Transformer) -> Optional[str]:
    """Why native kernels cannot run `model` here, or None when they can."""
    from . import native

    if native_setting() == "0":
        return "LLAMA_NATIVE=0"
    weight = model.norm.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}; native kernels are for the CPU"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the model is {weight.dtype}; native kernels run fp32 and bf16 models"
    attention = model.layers[0].attention
    if attention.n_local_heads != model.params.n_heads:
        return "the model is split across ranks; native kernels run at model-parallel size 1"
    p = model.params
    widths = {"dim": p.dim, "n_heads * head_dim": p.n_heads * p.head_dim, "ffn hidden dim": p.ffn_hidden_dim}
    odd = [f"{name} {width}" for name, width in widths.items() if width % native.BLOCK]
    if odd:
        return f"the model's {', '.join(odd)} not a multiple of {native.BLOCK}, which the native kernels need"
    if p.head_dim % 2 or p.head_dim > 512:
        return f"head_dim {p.head_dim} is odd or above 512, which the native decode step does not take"
    if not native.available():
        return f"the native library is off ({native.build.status()['reason']})"
    return None


def native_decode_problem(model: Transformer) -> Optional[str]:
    """Why the native decode step cannot run `model` here, or None when it can."""
    from .native import NativeLinear

    cache = model.layers[0].attention.cache
    if cache is None or cache.k.dtype != torch.float32:
        return "the model has no fp32 KV cache (call setup_caches)"
    if not torch.is_complex(model.rope):
        return "the model's rotary table is real-valued (the MPS form); the native step reads the complex one"
    projection = model.layers[0].attention.wq
    if not (isinstance(projection, NativeLinear) or isinstance(getattr(projection, "weight", None), torch.Tensor)):
        return (f"the model's projections are {type(projection).__name__} (quantize='int8' has its own "
                f"kernel); the native step reads float or GGML-quantized ones")
    return native_problem(model)


def _quantized_layout(model: Transformer) -> Optional[str]:
    """The GGML layout of a model quantized by llama.quantize ("q8_0", ...), else None."""
    from .native import NativeLinear

    projection = model.layers[0].attention.wq
    return projection.layout if isinstance(projection, NativeLinear) else None


def decode_key(model: Transformer, batch: int) -> Dict[str, object]:
    """What a measured verdict depends on: machine, software, model shape, dtype, threads, batch."""
    from .native.build import sources_digest

    p = model.params
    return {**machine_key_fields(), "kernels": sources_digest()[:16],
            "shape": [p.dim, p.n_layers, p.n_heads, p.kv_heads, p.ffn_hidden_dim, model.vocab_size],
            "dtype": str(model.norm.weight.dtype).replace("torch.", ""),
            "weights": _quantized_layout(model) or "float", "batch": batch}


def _verdict_file() -> Path:
    from .assets import cache_dir

    return cache_dir() / "tune" / "decode-backend.json"


def native_step_paths(model: Transformer) -> List[str]:
    """The native code paths whose decode steps are timed against PyTorch's, newest first: the
    newest this CPU runs and, for bf16 weights on a CPU with both AMX and AVX512-BF16, the
    AVX512-BF16 one too (the tile unit's fixed costs could lose on another CPU of its kind;
    on an Intel Xeon with AMX it read the demo's bf16 weights 1.3x faster at batch 1, 2x at
    batch 16). Other weights take the same AVX-512 code on either path."""
    from . import native
    from .native.tune import BF16_ONLY_PATHS

    newest = native.paths()[::-1]
    bf16 = [p for p in newest if p in BF16_ONLY_PATHS]
    if _quantized_layout(model) is None and model.norm.weight.dtype == torch.bfloat16 and len(bf16) == 2:
        return bf16
    return newest[:1]


def _time_decode(model: Transformer, native_steps: Dict[str, Callable], batch: int) -> Dict[str, float]:
    """Milliseconds of one decode step of `batch` rows on PyTorch and on each native step (by
    name): real steps on the model's own caches (rows 0..batch-1 at one position, restored
    afterwards)."""
    from .native.tune import best_time

    position = min(model.rope.shape[0] - 1, 64)
    tokens = torch.zeros(batch, dtype=torch.long)
    positions = torch.full((batch,), position, dtype=torch.long)
    caches = [layer.attention.cache for layer in model.layers]
    saved = [(c.k[:batch, position].clone(), c.v[:batch, position].clone()) for c in caches]

    def torch_step() -> None:
        with matmul_policy(tokens[:, None]):
            model(tokens[:, None], positions, kv_len=position + 1)

    steps = {"torch": torch_step, **{name: (lambda step=step: step(tokens, positions))
                                     for name, step in native_steps.items()}}
    try:
        with torch.inference_mode():
            return {name: 1e3 * best_time([step], _MEASURED_STEPS) for name, step in steps.items()}
    finally:
        for c, (k, v) in zip(caches, saved):
            c.k[:batch, position] = k
            c.v[:batch, position] = v


def choose_decode_backends(model: Transformer, batch_sizes: Sequence[int], native_steps: Dict[str, Callable],
                           measure: Optional[Callable[[int], Dict[str, float]]] = None) -> Dict[int, str]:
    """The fastest decode backend at each batch size ("torch" or a native step's name, e.g.
    "native:amx"), as measured on this machine for this model (cached in
    $LLAMA_CACHE/tune/decode-backend.json under decode_key()); measure(batch) -> {backend: ms}
    defaults to timing real steps."""
    measure = measure or (lambda batch: _time_decode(model, native_steps, batch))

    def measured(batch: int) -> dict:
        times = measure(batch)
        return {"ms": {b: round(t, 3) for b, t in times.items()}, "best": min(times, key=times.get)}

    # Native steps run at model-parallel size 1 only: no collective inside the measurement.
    entries = kept_verdicts(_verdict_file(), {b: decode_key(model, b) for b in sorted(set(batch_sizes))},
                            measured, "the decode-backend measurement")
    return {batch: entry["best"] for batch, entry in entries.items()}


class DecodeStep:
    """The native decode step for the batch sizes where it measured faster than PyTorch.

        step = decode_step(model, max_batch_size)    # None: PyTorch decodes everything
        if step is not None and step.wants(batch):
            logits = step(tokens, positions, rows)   # [B] each -> fp32 logits [B, V]

    decoders: native steps by name ("native:amx", ...), the default first; verdicts: batch
    size -> "torch", a decoder's name, or "native" (the default decoder).
    """

    def __init__(self, decoders: Dict[str, Callable], verdicts: Dict[int, str]):
        self.decoders, self.verdicts = decoders, verdicts

    def _verdict(self, batch: int) -> str:
        nearest = min(self.verdicts, key=lambda size: (abs(math.log2(size / batch)), size))
        return self.verdicts[nearest]

    def wants(self, batch: int) -> bool:
        """Whether `batch` rows decode natively: the verdict of the nearest measured size
        (never with LLAMA_NATIVE=0, looked at every step so that it can be set at any time)."""
        from . import native

        setting = native_setting()
        if batch > native.MAX_NATIVE_ROWS or setting == "0":
            return False
        return setting == "1" or self._verdict(batch) != "torch"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        decoder = self.decoders.get(self._verdict(tokens.numel())) or next(iter(self.decoders.values()))
        return decoder(tokens, positions, rows)


def decode_step(model: Transformer, max_batch_size: int) -> Optional[DecodeStep]:
    """The native decode step for `model` where it runs here and measures faster than
    PyTorch at batch 1 or max_batch_size, on the code path that measured fastest (always,
    on the newest path, for GGML-quantized weights, which only it reads at full speed, and
    with LLAMA_NATIVE=1); None where PyTorch decodes (LLAMA_NATIVE=0, not the CPU,
    model-parallel, no library, or slower)."""
    if native_decode_problem(model) is not None:
        return None
    from . import native
    from .native.decode import NativeDecoder

    decoders = {f"native:{path}": NativeDecoder(model, path=path) for path in native_step_paths(model)}
    # Steps of more rows than the native kernels take always run in PyTorch: not measured.
    sizes = {1, min(max_batch_size, model.layers[0].attention.cache.k.shape[0], native.MAX_NATIVE_ROWS)}
    if _quantized_layout(model) is not None or native_setting() == "1":
        return DecodeStep(decoders, {size: "native" for size in sizes})
    return DecodeStep(decoders, choose_decode_backends(model, sizes, decoders))
