"""The native bf16 prompt attention (llama.native.attention) against PyTorch's attention in
fp32 on the same bf16 inputs: within what bf16 itself costs (PyTorch's own bf16 attention is
the yardstick), at grouped and ungrouped heads, prompt lengths around its blocks, batches and
views of a fused product; and inside the model, where the engine runs it on a prompt's first
chunk when it is measured faster."""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.errors import LlamaError
from llama.native import attention as native_attention
from llama.runtime import backend
from llama.testing import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _needs_the_kernel():
    q = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    problem = native_attention.attention_problem(q, q)
    if problem is not None:
        pytest.skip(problem)


def _reference(q, k, v, dtype=torch.float32):
    """PyTorch's causal attention on the heads-first transposes, in `dtype`, as [B, S, H, D]."""
    out = F.scaled_dot_product_attention(*(t.to(dtype).transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2).float()


def _inputs(batch, seqlen, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, n, dim, generator=g).to(torch.bfloat16) for n in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("batch, seqlen, heads, kv_heads, dim", [
    (1, 1, 2, 1, 64),      # one token: the output is its value
    (2, 5, 4, 2, 64),      # fewer rows than a tile
    (1, 64, 9, 3, 64),     # one key block exactly (the demo's heads)
    (1, 67, 4, 4, 128),    # past a block, odd length, no grouping
    (2, 130, 8, 2, 64),    # three blocks, batch 2
    (1, 257, 4, 1, 256),   # the largest head size
])
def test_matches_pytorch_within_bf16(batch, seqlen, heads, kv_heads, dim):
    q, k, v = _inputs(batch, seqlen, heads, kv_heads, dim)
    ours = native_attention.causal_attention(q, k, v)
    assert ours.shape == (batch, seqlen, heads, dim) and ours.dtype == torch.bfloat16 and ours.is_contiguous()
    exact = _reference(q, k, v)
    theirs = _reference(q, k, v, torch.bfloat16)  # what bf16 costs PyTorch's own kernel
    ours_err, their_err = (ours.float() - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert ours_err <= 2 * their_err + 1e-3, (ours_err, their_err)
    assert ((ours.float() - exact).norm() / exact.norm()).item() < 4e-3
    torch.testing.assert_close(ours[:, 0].float(), v[:, 0].float().repeat_interleave(heads // kv_heads, dim=1))


def test_views_of_a_fused_product_and_threads_give_the_same_bits():
    """q, k, v as slices of one [B, S, (H + 2K) D] product (strided tokens) compute what their
    contiguous copies do; one thread and the team agree to the bit."""
    batch, seqlen, heads, kv_heads, dim = 2, 70, 4, 2, 64
    fused = torch.randn(batch, seqlen, (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    q, k, v = fused.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q, k, v = q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim)), v.unflatten(-1, (kv_heads, dim))
    assert not q.is_contiguous()
    strided = native_attention.causal_attention(q, k, v)
    copied = native_attention.causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), threads=1)
    assert torch.equal(strided, copied)


def test_what_it_cannot_take_is_refused_by_name():
    q, k, v = _inputs(1, 8, 4, 2, 64)
    with pytest.raises(LlamaError, match="bf16"):
        native_attention.causal_attention(q.float(), k.float(), v.float())
    with pytest.raises(LlamaError, match="head_dim 32"):
        native_attention.causal_attention(*_inputs(1, 8, 4, 2, 32))
    with pytest.raises(LlamaError, match="3 query heads"):
        native_attention.causal_attention(*_inputs(1, 8, 3, 2, 64))
    with pytest.raises(LlamaError, match="k \\[1, 8, 2, 64\\] and v \\[1, 7, 2, 64\\]"):
        native_attention.causal_attention(q, k, v[:, :7])


# ---- inside the model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def head64_ckpt(tmp_path_factory):
    """A tiny random model whose head size the kernel takes (64), with grouped heads."""
    params = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32000, multiple_of=32,
                  norm_eps=1e-5, rope_theta=10000.0)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("head64"), params=params)


def _build(ckpt, tokenizer, dtype):
    return Llama.build(str(ckpt), tokenizer, max_seq_len=128, max_batch_size=4, device="cpu", dtype=dtype)


def test_the_models_prompt_logprobs_stay_within_the_bf16_bounds(head64_ckpt, sp_tokenizer, monkeypatch, tmp_path):
    """The bf16 build's prompt logprobs with the native kernel against the fp32 build: within
    the bounds the bf16 build is held to (tests/test_default_dtype.py: total variation 0.06,
    |logprob diff| 0.6), as with PyTorch's bf16 attention, and another computation than it."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    reference, gen = _build(head64_ckpt, sp_tokenizer, "fp32"), _build(head64_ckpt, sp_tokenizer, "bf16")
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the hills " * 2
    tokens = torch.tensor([gen.tokenizer.encode(text, bos=True, eos=False)])
    assert tokens.shape[1] > 40
    lows = {}
    with torch.inference_mode():
        high = torch.log_softmax(reference.model(tokens, 0)[0], -1)
        for native in (False, True):
            for layer in gen.model.layers:
                layer.attention.prompt_attention_dtype = torch.bfloat16
                layer.attention.prompt_attention_native = native
            lows[native] = low = torch.log_softmax(gen.model(tokens, 0)[0].float(), -1)
            assert (low.exp() - high.exp()).abs().sum(-1).max().item() / 2 < 0.06
            assert (low - high).abs().max().item() < 0.6
    assert not torch.equal(lows[False], lows[True])


def test_the_engine_runs_it_on_a_prompts_own_keys_where_measured_faster(head64_ckpt, sp_tokenizer, monkeypatch,
                                                                         tmp_path):
    """Chosen by (faked) timing: the first prompt chunk of each layer goes to the kernel; later
    chunks (which read the cache) and decode steps do not."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(backend, "time_prompt_attention", lambda dtype, *shape: 0.5 if dtype == torch.bfloat16 else 1.0)
    monkeypatch.setattr(backend, "time_native_prompt_attention", lambda *shape: 0.1)
    gen = _build(head64_ckpt, sp_tokenizer, "bf16")
    gen.engine.prefill_chunk = 16
    calls, real = [], native_attention.causal_attention
    monkeypatch.setattr("llama.model.transformer.causal_attention",
                        lambda q, k, v: calls.append(q.shape[1]) or real(q, k, v))
    prompt = gen.tokenizer.encode("Once upon a time, in a land far away, there lived a fox " * 2, bos=True, eos=False)
    assert len(prompt) > 16
    out = gen.generate([prompt], 4, temperature=0)[0][0]
    assert len(out) == 4
    assert calls == [16] * len(gen.model.layers), calls
    assert all(layer.attention.prompt_attention_native for layer in gen.model.layers)
