"""The model's accelerator-only forms, run on the CPU by faking the device type they key on:
attention that gives an efficient kernel what it accepts (a mask together with grouped query
heads only where an efficient kernel takes it), and the real-valued rotary form for MPS. Each
must equal the CPU path, and attention an explicit reference written here."""

import math

import pytest
import torch
import torch.nn.functional as F

import llama.model.attention
import llama.model.rotary
import llama.model.transformer
from llama import Llama
from llama.model import ModelArgs
from llama.model.attention import attend
from llama.model.rotary import apply_rotary, rotation_table

PROMPTS = ["Hello world", "The capital of France is", "Once upon a time, in a land far away, there", "A"]


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every scaled_dot_product_attention call: (query heads, key heads, mask given, query rows)."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, q.shape[2]))
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        if llama.model.attention.attention_device_type(q) != "cpu":  # strided, as CUDA's efficient kernel returns it
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    # The model's own decode steps: the native CPU step (llama.runtime.backend), which never runs on
    # accelerators, would otherwise take them here.
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    return calls


def fake_device_type(monkeypatch, device_type: str) -> None:
    """device_type "cuda+gqa-mask": a CUDA device whose efficient kernel takes a mask with
    grouped heads (torch 2.11 on an H200); "cuda": one whose kernels do not."""
    monkeypatch.setattr(llama.model.attention, "attention_device_type", lambda t: device_type.split("+")[0])
    monkeypatch.setattr(llama.model.attention, "efficient_kernel_takes_grouped_mask",
                        lambda *args: device_type == "cuda+gqa-mask")


def reference_attention(q, k, v, mask):
    """Softmax(q k^T / sqrt(D)) v with each key/value head repeated for its query heads;
    mask None: key j visible to query i iff j <= i + L - S (causal, aligned at the end)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is None:
        s, length = q.shape[2], k.shape[2]
        mask = torch.arange(length) <= torch.arange(s).unsqueeze(1) + length - s
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


CASES = {  # (batch, query heads, key heads, query rows S, keys L, mask kind)
    "gqa_ragged_decode": (3, 8, 2, 1, 7, "ragged"),
    "gqa_ragged_prefill": (2, 4, 2, 5, 9, "ragged"),
    "mha_ragged_decode": (2, 4, 4, 1, 6, "ragged"),
    "gqa_common_decode": (2, 6, 3, 1, 5, None),
    "gqa_prefill": (2, 4, 1, 6, 6, None),
}


@pytest.mark.parametrize("device_type", ["cuda", "cuda+gqa-mask", "mps", "cpu"])
@pytest.mark.parametrize("case", CASES)
def test_attend_sends_mask_with_grouped_heads_only_where_a_kernel_takes_them(case, device_type, sdpa_calls,
                                                                            monkeypatch):
    batch, heads, kv_heads, s, length, kind = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, s, 16, generator=g)
    k, v = torch.randn(2, batch, kv_heads, length, 16, generator=g)
    mask = None
    if kind == "ragged":  # each row ends at its own position
        ends = torch.tensor([length - 1 - row for row in range(batch)])
        positions = ends.unsqueeze(1) - s + 1 + torch.arange(s)
        mask = (torch.arange(length) <= positions.unsqueeze(-1)).unsqueeze(1)
    fake_device_type(monkeypatch, device_type)

    out = attend(q, k, v, mask)

    torch.testing.assert_close(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert len(sdpa_calls) == 1
    q_heads, k_heads, masked, rows = sdpa_calls[0]
    if device_type in ("cuda", "mps"):
        assert not (masked and q_heads != k_heads), sdpa_calls
    if device_type in ("cuda", "mps") and kind == "ragged" and heads != kv_heads:  # folded, not dropped
        assert masked and (q_heads, rows) == (kv_heads, heads // kv_heads * s)
    if device_type in ("cpu", "cuda+gqa-mask") and kind == "ragged":  # as it is: the kernel takes it
        assert masked and (q_heads, k_heads, rows) == (heads, kv_heads, s)


@pytest.mark.parametrize("device_type", ["cuda", "cuda+gqa-mask"])
def test_decode_on_accelerators_equals_cpu(device_type, generator, sdpa_calls, monkeypatch):
    """A ragged batch (masked decode) and a single prompt (maskless decode) through the whole
    model, with the attention forms of a CUDA device, give the CPU path's tokens and logprobs."""
    prompts = [generator.tokenizer.encode(t, bos=True, eos=False) for t in PROMPTS]
    assert generator.model.params.n_heads != generator.model.params.kv_heads  # the tiny model has GQA
    expected = [generator.generate(p, max_gen_len=8, temperature=0, logprobs=True) for p in (prompts, prompts[:1])]
    sdpa_calls.clear()

    fake_device_type(monkeypatch, device_type)
    for batch, (tokens, logprobs) in zip((prompts, prompts[:1]), expected):
        got_tokens, got_logprobs = generator.generate(batch, max_gen_len=8, temperature=0, logprobs=True)
        assert got_tokens == tokens
        for got, want in zip(got_logprobs, logprobs):
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4

    grouped_with_mask = [c for c in sdpa_calls if c[2] and c[0] != c[1]]
    assert bool(grouped_with_mask) == (device_type == "cuda+gqa-mask"), sdpa_calls
    assert any(c[2] for c in sdpa_calls)  # the ragged batch decoded with a mask
    single = [c for c in sdpa_calls if c[3] == 1 and not c[2]]
    assert single  # one prompt: every decode step without a mask (flash attention's case)


def test_grouped_mask_probe_answers_what_the_kernel_did_without_warnings(monkeypatch):
    """The probe says yes where the kernel call (efficient kernels only) returns, no where it
    raises, and lets none of torch's per-kernel warnings reach the user."""
    import warnings

    probe = llama.model.attention.efficient_kernel_takes_grouped_mask
    real = F.scaled_dot_product_attention

    def refusing(*args, **kwargs):
        warnings.warn("Flash Attention does not support non-null attn_mask.")
        raise RuntimeError("No available kernel. Aborting execution.")

    for kernel, expected in ((real, True), (refusing, False)):
        probe.cache_clear()
        monkeypatch.setattr(F, "scaled_dot_product_attention", kernel)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert probe(torch.device("cpu"), torch.float32, 16) is expected
    probe.cache_clear()


def test_decode_at_a_common_position_runs_without_mask(generator, sdpa_calls):
    """Rows that all sit at the end of the cache need no mask, on every device: equal-length
    prompts decode without one, a ragged batch with one."""
    same = [generator.tokenizer.encode("Hello world", bos=True, eos=False)] * 2
    generator.engine.prefix_cache = False  # rows 0 and 1, not where an earlier prompt was cached
    try:
        generator.generate(same, max_gen_len=4, temperature=0)
    finally:
        generator.engine.prefix_cache = True
    decode_steps = [c for c in sdpa_calls if c[3] == 1]
    assert decode_steps and not any(c[2] for c in decode_steps)


# ---- rotary embedding: complex (CPU, CUDA) and real (MPS) forms ----------------------------------

def test_real_rotation_equals_complex_rotation():
    args = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0, use_scaled_rope=True)
    complex_table, real_table = rotation_table(args, 300), rotation_table(args, 300, complex_form=False)
    assert complex_table.is_complex() and not real_table.is_complex() and real_table.shape == (300, 8, 2)
    assert llama.model.rotary.complex_rotation(torch.device("cuda", 0)) and not llama.model.rotary.complex_rotation(torch.device("mps"))
    positions = torch.tensor([[0, 1, 2], [297, 298, 299]])
    x = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        a = apply_rotary(x.to(dtype), complex_table[positions].unsqueeze(2), torch.float32)
        b = apply_rotary(x.to(dtype), real_table[positions].unsqueeze(2), torch.float32)
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    # and both rotate as Meta's layout says: pair (x0, x1) at angle t -> (x0 cos t - x1 sin t, x0 sin t + x1 cos t)
    angle = float(real_table[299, 3, 1].atan2(real_table[299, 3, 0]))
    x0, x1 = x[1, 2, 0, 6].item(), x[1, 2, 0, 7].item()
    out = apply_rotary(x, real_table[positions].unsqueeze(2), torch.float32)[1, 2, 0, 6:8]
    expected = torch.tensor([x0 * math.cos(angle) - x1 * math.sin(angle), x0 * math.sin(angle) + x1 * math.cos(angle)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_model_with_real_rotation_equals_complex(tiny_ckpt, sp_tokenizer, monkeypatch):
    complex_gen = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=2, device="cpu")
    monkeypatch.setattr(llama.model.transformer, "complex_rotation", lambda device: False)  # MPS's form, on the CPU
    real_gen = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=2, device="cpu")
    assert complex_gen.model.rope.is_complex() and not real_gen.model.rope.is_complex()
    tokens = torch.tensor([complex_gen.tokenizer.encode(PROMPTS[2], bos=True, eos=False)])
    torch.testing.assert_close(real_gen.model(tokens), complex_gen.model(tokens), atol=1e-4, rtol=1e-5)
    prompt = tokens[0].tolist()
    assert (real_gen.generate([prompt], max_gen_len=10, temperature=0)[0]
            == complex_gen.generate([prompt], max_gen_len=10, temperature=0)[0])


def test_forward_in_chunks_equals_one_pass(generator):
    """Whatever mask the model leaves out must not change its logits: a prompt fed in chunks at
    later positions (Meta's int start_pos), and one token read with stale cache slots beyond it
    (an explicit kv_len), equal one pass over the whole prompt."""
    model = generator.model
    text = "Once upon a time, in a land far away, there lived a very old king and his three daughters"
    tokens = torch.tensor([generator.tokenizer.encode(text, bos=True, eos=False)[:12]])
    model(torch.flip(tokens, [1]), 0)  # other keys in every slot, to be overwritten or masked
    whole = model(tokens[:, :10], 0)

    model(torch.flip(tokens, [1]), 0)
    chunks = [model(tokens[:, :6], 0), model(tokens[:, 6:9], 6),
              model(tokens[:, 9:10], torch.tensor([9]), kv_len=12)]  # slots 10, 11 hold stale keys
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=2e-2, rtol=0)
