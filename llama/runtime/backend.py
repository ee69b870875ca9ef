"""The backend policy: how the model's computations run on this machine, chosen from outside
the model and applied around its calls (by the engine), never by flags flipped inside it.

- matmul_policy(): for a single row on the CPU (batch-1 decode), PyTorch's plain kernels
  instead of oneDNN's, whose fixed cost pays off only from two rows up (docs/benchmarks.md).
- choose_decode_step(): the decode step on PyTorch (eager, with that rule) or the native
  step (llama.native.decode: one call per step) on one of its code paths, by timing real
  steps of the model on this machine, once per machine, software and model shape.
- prompt_attention_dtype() and prompt_attention_native(): a prompt's attention over its own
  keys in the KV cache's fp32 or the model's bf16/fp16, on PyTorch's attention or the native
  bf16 kernel, by timing them.

Every choice is kept per machine (llama.utils.measurements), so every process here makes the
same one.
"""

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .. import native, settings
from ..model import Transformer
from ..model.quantize import quantized_layout
from ..native.attention import attention_problem, causal_attention
from ..native.build import sources_digest
from ..native.decode import NativeDecoder, decode_problem
from ..native.kernel_choice import BF16_ONLY_PATHS
from ..utils.measurements import best_time, kept, machine_fields, stable_times, verdict_file


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


# ---- a prompt's attention: in the KV cache's fp32, the model's dtype or natively, by measurement ----

PROMPT_TOKENS_TIMED = 256
PROMPT_ATTENTION_MARGIN = 0.8  # a challenger must be this much faster: no flip-flop near a tie


def prompt_attention_dtype(model: Transformer) -> Optional[torch.dtype]:
    """The dtype for a prompt's attention over its own keys, where attention over the KV cache
    runs in another dtype than the model's (fp32 on the CPU, llama.model.cache.attention_dtype): the
    model's (bf16, fp16) where its attention ran a 256-token prompt faster than the cache's on
    this machine (PyTorch's CPU flash attention in that dtype, or the native bf16 kernel: see
    prompt_attention_native), else None (the cache's). Measured once per machine, software and
    head shape and kept in $LLAMA_CACHE/tune/prompt-attention.json, so that every process here
    makes the same choice (a server and a script, the ranks of a job, agree to the last bit).
    Decode steps keep the cache's dtype: bf16 is slower for one query (docs/benchmarks.md)."""
    verdict = _prompt_attention_verdict(model)
    return None if verdict is None or not (verdict["model_dtype"] or verdict.get("native")) \
        else model.norm.weight.dtype


def prompt_attention_native(model: Transformer) -> bool:
    """Whether a prompt's attention over its own keys runs on the native bf16 kernel
    (llama.native.attention), measured faster than PyTorch's in either dtype (the same verdict
    as prompt_attention_dtype's)."""
    verdict = _prompt_attention_verdict(model)
    return bool(verdict and verdict.get("native"))


def _prompt_attention_verdict(model: Transformer) -> Optional[dict]:
    attention = model.layers[0].attention
    cache_dtype, model_dtype = attention.cache.attention_dtype, model.norm.weight.dtype  # what decode attends in
    if attention.cache.k.device.type != "cpu" or model_dtype == cache_dtype:
        return None
    shape = (attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim)

    def measure(_) -> dict:
        ms = {str(d).replace("torch.", ""): 1e3 * time_prompt_attention(d, *shape) for d in (model_dtype, cache_dtype)}
        model_ms, cache_ms = ms.values()
        native_s = time_native_prompt_attention(*shape) if model_dtype == torch.bfloat16 else None
        native = native_s is not None and 1e3 * native_s < PROMPT_ATTENTION_MARGIN * min(model_ms, cache_ms)
        if native_s is not None:
            ms["native"] = 1e3 * native_s
        return {"ms": ms, "model_dtype": model_ms < PROMPT_ATTENTION_MARGIN * cache_ms, "native": native}

    return kept(verdict_file("prompt-attention"), {"": prompt_attention_key(model_dtype, cache_dtype, shape)},
                measure, "the prompt-attention measurement")[""]


def prompt_attention_key(model_dtype: torch.dtype, cache_dtype: torch.dtype, shape: Sequence[int]) -> dict:
    """What the prompt-attention verdict depends on: machine, software (the native kernels'
    sources too), heads, dtypes, threads."""
    return {**machine_fields(), "kernels": sources_digest()[:16], "heads": list(shape),
            "dtypes": [str(model_dtype), str(cache_dtype)]}


def _prompt_inputs(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, PROMPT_TOKENS_TIMED, head_dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, PROMPT_TOKENS_TIMED, head_dim, generator=g).to(dtype)
    return q, k


def time_prompt_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> float:
    """Seconds of PyTorch's causal attention over a PROMPT_TOKENS_TIMED-token prompt: the best of 10."""
    q, k = _prompt_inputs(dtype, heads, kv_heads, head_dim)
    return best_time([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                               enable_gqa=True)], 10)


def time_native_prompt_attention(heads: int, kv_heads: int, head_dim: int) -> Optional[float]:
    """Seconds of the native bf16 kernel on the same prompt (the best of 10), or None where it
    cannot run (no AVX512-BF16, a head size it does not take)."""
    q, k = (t.transpose(1, 2) for t in _prompt_inputs(torch.bfloat16, heads, kv_heads, head_dim))
    if attention_problem(q, k) is not None:
        return None
    return best_time([lambda: causal_attention(q, k, k)], 10)


# ---- the decode step: PyTorch or the native step, chosen by measurement ----------------------

DECODE_BACKENDS = ("torch", "native")
TORCH_STEP_MARGIN = 0.9  # PyTorch's step is kept only where it takes at most this share of the native one's time
_MEASURED_STEPS = 5  # timed decode steps per backend and batch size (after 2 unmeasured ones)


def decode_key(model: Transformer, batch: int) -> Dict[str, object]:
    """What a measured verdict depends on: machine, software, model shape, dtypes (the KV
    cache's too), threads, batch."""
    p = model.params
    return {**machine_fields(), "kernels": sources_digest()[:16],
            "shape": [p.dim, p.n_layers, p.n_heads, p.kv_heads, p.ffn_hidden_dim, model.vocab_size],
            "dtype": str(model.norm.weight.dtype).replace("torch.", ""),
            "cache": str(model.layers[0].attention.cache.k.dtype).replace("torch.", ""),
            "weights": quantized_layout(model) or "float", "batch": batch}


def native_step_paths(model: Transformer) -> List[str]:
    """The native code paths whose decode steps are timed against PyTorch's, newest first: the
    newest this CPU runs and, for bf16 weights on a CPU with both AMX and AVX512-BF16, the
    AVX512-BF16 one too (the tile unit's fixed costs could lose on another CPU of its kind;
    docs/native-kernels.md has the measurements). Other weights take the same AVX-512 code
    on either path."""
    newest = native.paths()[::-1]
    bf16 = [p for p in newest if p in BF16_ONLY_PATHS]
    if quantized_layout(model) is None and model.norm.weight.dtype == torch.bfloat16 and len(bf16) == 2:
        return bf16
    return newest[:1]


def _time_decode(model: Transformer, native_steps: Dict[str, Callable], batch: int) -> Dict[str, float]:
    """Milliseconds of one decode step of `batch` rows on PyTorch and on each native step (by
    name): real steps on the model's own caches (rows 0..batch-1 at one position, restored
    afterwards)."""
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


STABLE_ROUNDS = 4  # the most rounds a decode-backend verdict is timed in


def choose_decode_backends(model: Transformer, batch_sizes: Sequence[int], native_steps: Dict[str, Callable],
                           measure: Optional[Callable[[int], Dict[str, float]]] = None) -> Dict[int, str]:
    """The fastest decode backend at each batch size ("torch" or a native step's name, e.g.
    "native:amx"), as measured on this machine for this model (cached in
    $LLAMA_CACHE/tune/decode-backend.json under decode_key()); measure(batch) -> {backend: ms}
    defaults to timing real steps."""
    measure = measure or (lambda batch: _time_decode(model, native_steps, batch))

    def measured(batch: int) -> dict:
        best, rounds = stable_times(lambda: measure(batch), STABLE_ROUNDS)
        return {"ms": {b: round(t, 3) for b, t in best.items()}, "best": _decode_winner(best), "rounds": rounds}

    # Native steps run at model-parallel size 1 only: no collective inside the measurement.
    entries = kept(verdict_file("decode-backend"), {b: decode_key(model, b) for b in sorted(set(batch_sizes))},
                   measured, "the decode-backend measurement")
    return {batch: entry["best"] for batch, entry in entries.items()}


def _decode_winner(ms: Dict[str, float]) -> str:
    """The backend to keep from measured step times: the fastest native step unless PyTorch's
    is clearly faster (TORCH_STEP_MARGIN). A verdict is kept for good, and on a shared machine
    a tie can fall either way (a Llama-3.2-1B-shaped bf16 step measured 89.4 ms in PyTorch
    against 89.8 natively in a busy moment, where the native step otherwise takes 70-84)."""
    natives = {name: t for name, t in ms.items() if name != "torch"}
    if not natives:
        return "torch"
    fastest = min(natives, key=natives.get)
    return "torch" if "torch" in ms and ms["torch"] < TORCH_STEP_MARGIN * natives[fastest] else fastest


class NativeDecodeStep:
    """The native decode step for the batch sizes where it measured faster than PyTorch.

        step = choose_decode_step(model, max_batch_size)   # None: PyTorch decodes everything
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
        setting = settings.get("LLAMA_NATIVE")
        if batch > native.MAX_NATIVE_ROWS or setting == "0":
            return False
        return setting == "1" or self._verdict(batch) != "torch"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        decoder = self.decoders.get(self._verdict(tokens.numel())) or next(iter(self.decoders.values()))
        return decoder(tokens, positions, rows)


def choose_decode_step(model: Transformer, max_batch_size: int) -> Optional[NativeDecodeStep]:
    """The native decode step for `model` where it runs here and measures faster than
    PyTorch at batch 1 or max_batch_size, on the code path that measured fastest (always,
    on the newest path, for GGML-quantized weights, which only it reads at full speed, and
    with LLAMA_NATIVE=1); None where PyTorch decodes (LLAMA_NATIVE=0, not the CPU,
    model-parallel, no library, or slower)."""
    if decode_problem(model) is not None:
        return None
    decoders = {f"native:{path}": NativeDecoder(model, path=path) for path in native_step_paths(model)}
    # Steps of more rows than the native kernels take always run in PyTorch: not measured.
    sizes = {1, min(max_batch_size, model.layers[0].attention.cache.k.shape[0], native.MAX_NATIVE_ROWS)}
    if quantized_layout(model) is not None or settings.get("LLAMA_NATIVE") == "1":
        return NativeDecodeStep(decoders, {size: "native" for size in sizes})
    return NativeDecodeStep(decoders, choose_decode_backends(model, sizes, decoders))
