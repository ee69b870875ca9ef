"""The KV cache's dtype (LLAMA_KV_CACHE): fp32 on the CPU unless bf16 is asked for, the bf16
cache's cost in accuracy against the fp32 one, and the native decode step on a bf16 cache
against PyTorch's on the same cache: its plain loops (any CPU) to fp32 rounding, its
VDPBF16PS kernel (AVX512-BF16 CPUs) to the bit pattern of an attention that rounds queries
and probabilities to bf16 the same way, emulated here in PyTorch."""

import itertools

import pytest
import torch

from llama import Llama
from llama import native
from llama.errors import LlamaError
from llama.model import transformer
from llama.model.cache import kv_cache_dtype
from llama.runtime.memory import kv_cache_bytes
from llama.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def head64_ckpt(tmp_path_factory):
    """A tiny random model with head size 64 and two query heads per key/value head."""
    params = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                  norm_eps=1e-5, rope_theta=10000.0)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("kv-head64"), params=params)


@pytest.fixture(autouse=True)
def _no_tuning_at_first_use(monkeypatch):
    monkeypatch.setenv("LLAMA_TUNE", "0")


@pytest.fixture
def native_step():
    """The native library (built here if needed); skips where it cannot be."""
    problem = native.problem(torch.device("cpu"), torch.float32)
    if problem is not None:
        pytest.skip(problem)


def _model(ckpt, tokenizer, dtype, cache, monkeypatch, rows=3):
    monkeypatch.setenv("LLAMA_KV_CACHE", cache)
    return Llama.build(str(ckpt), tokenizer, max_seq_len=64, max_batch_size=rows, device="cpu", dtype=dtype).model


def test_the_setting_chooses_the_cache_dtype(monkeypatch, head64_ckpt, sp_tokenizer):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("LLAMA_KV_CACHE", raising=False)
    assert kv_cache_dtype(cpu, torch.bfloat16) == torch.float32
    assert kv_cache_dtype(cuda, torch.float16) == torch.float16
    monkeypatch.setenv("LLAMA_KV_CACHE", "bf16")
    assert kv_cache_dtype(cpu, torch.float32) == torch.bfloat16
    assert kv_cache_dtype(cuda, torch.float16) == torch.bfloat16
    monkeypatch.setenv("LLAMA_KV_CACHE", "fp32")
    assert kv_cache_dtype(cuda, torch.bfloat16) == torch.float32
    monkeypatch.setenv("LLAMA_KV_CACHE", "int8")
    with pytest.raises(LlamaError, match="LLAMA_KV_CACHE='int8'"):
        kv_cache_dtype(cpu, torch.float32)
    model = _model(head64_ckpt, sp_tokenizer, "bf16", "bf16", monkeypatch)
    cache = model.layers[0].attention.cache
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and cache.attention_dtype == torch.float32
    # what the memory check counts is what was allocated
    counted = kv_cache_bytes(model.params, 3, 64, 1, kv_cache_dtype(cpu, torch.bfloat16))
    assert counted == sum(layer.attention.cache.k.nbytes * 2 for layer in model.layers)


def _prefill_and_decode(model, steps=12, make_step=None, feed=None):
    """Prefill 3 ragged prompts (lengths around the kernel's blocks of 16), then decode
    `steps` tokens, with Transformer.forward or, from the same caches, make_step(model): the
    tokens in `feed` where given, else each step's greedy choices. Returns the logits of each
    step and the tokens fed."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([17, 31, 6])
    prompts = torch.randint(0, model.vocab_size, (3, 31), generator=g)
    logits = model(prompts, 0, last_index=lengths - 1).float()
    step = make_step(model) if make_step else None
    out, fed = [], []
    for i in range(steps):
        tokens, positions = logits.argmax(-1) if feed is None else feed[i], lengths + i
        if step is None:
            logits = model(tokens[:, None], positions, kv_len=int(positions.max()) + 1)[:, -1].float()
        else:
            logits = step(tokens, positions)
        out.append(logits)
        fed.append(tokens)
    return out, fed


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_bf16_cache_stays_close_to_the_fp32_one(dtype, head64_ckpt, sp_tokenizer, monkeypatch):
    """The cost of keeping keys and values in bf16, PyTorch's step on both: each step's
    logits from the same tokens (the bf16 cache's greedy choices are fed to both)."""
    exact = _model(head64_ckpt, sp_tokenizer, dtype, "fp32", monkeypatch)
    rounded = _model(head64_ckpt, sp_tokenizer, dtype, "bf16", monkeypatch)
    ref, fed = _prefill_and_decode(exact)
    ours, _ = _prefill_and_decode(rounded, feed=fed)
    worst = max(((o - r).abs().max() / r.abs().max()).item() for r, o in zip(ref, ours))
    # bf16 keeps 8 bits: a value's rounding is at most 0.4% of it
    assert 0 < worst < (0.01 if dtype == "fp32" else 0.03), worst


def _native_paths(kernel: bool):
    """The native code paths of this CPU whose attention over a bf16 cache is the VDPBF16PS
    kernel (kernel=True) or the plain loops."""
    with_kernel = ("avx512_bf16", "amx")
    found = [p for p in native.paths() if (p in with_kernel) == kernel]
    if not found:
        pytest.skip(f"this CPU runs no path {'with' if kernel else 'without'} the bf16 attention kernel")
    return found


def test_the_native_step_equals_pytorchs_on_a_bf16_cache(native_step, head64_ckpt, sp_tokenizer, monkeypatch):
    """The plain loops widen the cache's bf16 as PyTorch's step does: fp32 rounding apart."""
    from llama.native.decode import NativeDecoder

    for path in _native_paths(kernel=False):
        model = _model(head64_ckpt, sp_tokenizer, "fp32", "bf16", monkeypatch)
        ref, fed = _prefill_and_decode(model)
        model = _model(head64_ckpt, sp_tokenizer, "fp32", "bf16", monkeypatch)
        ours, _ = _prefill_and_decode(model, make_step=lambda m: NativeDecoder(m, path=path), feed=fed)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-3 * r.abs().max().item(), msg=path)


_attend = transformer.attend


def _rounding_attention(q, k, v, mask):
    """attend() for a decode step (one query per row) as the VDPBF16PS kernel computes it:
    queries and probabilities rounded to bf16, everything else in fp32; a prompt's as before.
    q [B, H, 1, D], k, v [B, K, L, D]."""
    if q.shape[2] > 1:
        return _attend(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    q = q.bfloat16().float()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).bfloat16().float() @ v


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_bf16_kernel_equals_its_rounding_in_pytorch(dtype, native_step, head64_ckpt, sp_tokenizer,
                                                        monkeypatch):
    """The VDPBF16PS kernel against PyTorch's step with the same roundings: to fp32 rounding
    in an fp32 model (far closer than to PyTorch's own step, so it checks the kernel's
    every product and reordering); in a bf16 model, within its own rounding of activations."""
    from llama.native.decode import NativeDecoder

    # one thread: each attention task takes every query head of a token, so spans both KV heads
    for path, threads in itertools.product(_native_paths(kernel=True), (0, 1)):
        with monkeypatch.context() as patch:
            patch.setattr(transformer, "attend", _rounding_attention)
            model = _model(head64_ckpt, sp_tokenizer, dtype, "bf16", monkeypatch)
            ref, fed = _prefill_and_decode(model)
        model = _model(head64_ckpt, sp_tokenizer, dtype, "bf16", monkeypatch)
        ours, _ = _prefill_and_decode(model, make_step=lambda m: NativeDecoder(m, path=path, threads=threads),
                                      feed=fed)
        model = _model(head64_ckpt, sp_tokenizer, dtype, "bf16", monkeypatch)
        plain, _ = _prefill_and_decode(model, feed=fed)
        for r, o, p in zip(ref, ours, plain):
            scale = r.abs().max().item()
            if dtype == "fp32":
                torch.testing.assert_close(o, r, rtol=0, atol=5e-4 * scale, msg=path)
                assert (p - r).abs().max() > 5 * (o - r).abs().max(), "the roundings are not what is tested"
            else:  # PyTorch's bf16 logits are rounded to bf16, ours are not
                torch.testing.assert_close(o, r, rtol=0, atol=0.02 * scale, msg=path)


