"""The dtype users get when they pass none (bf16 on CPUs with native bf16, as this project's
machine has): the rule itself, read from the CPU's flags independently of llama.runtime.devices, and the
engine built and run in it (the rest of the suite pins LLAMA_DTYPE=fp32 for exact parity):
bit-exact weights after resharding, streaming equal to generate, valid text, and agreement with
fp32 within a stated bound."""

import pytest
import torch

import llama.runtime.devices
from helpers.precision import BF16_LOGPROB_BOUND, BF16_TIE_GAP, BF16_TV_BOUND, DEFAULT_HERE, NATIVE_BF16_HERE  # noqa: F401
from helpers.weights import expected_rank_weights, pose_as_rank, wrong_weights
from llama import Llama
from llama.runtime.devices import cpu_has_native_bf16, default_dtype, resolve_dtype

PROMPTS_FOR_DTYPE = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there",
                     "naïve café, 東京 🚀"]


@pytest.mark.parametrize("flags, native", [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # x86 with AVX512-BF16 (this project's CPU)
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids AMX
    ("fp asimd bf16 i8mm", True),  # ARMv8.6 (Graviton 3, Apple M2 under Linux)
    ("fpu avx2 avx512f avx512_vnni", False),  # AVX-512 without bf16: emulated, slow
    ("fp asimd", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, native, monkeypatch):
    monkeypatch.setattr(llama.runtime.devices, "cpu_flags", lambda: flags.split())
    assert cpu_has_native_bf16() is native
    assert default_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_this_machines_cpu_is_judged_by_its_flags():
    assert cpu_has_native_bf16() is NATIVE_BF16_HERE
    assert default_dtype(torch.device("cpu")) == DEFAULT_HERE


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_default_is_bf16_or_fp32_never_fp16(native, monkeypatch):
    """fp16 on a CPU overflows where bf16 does not and has no fast kernels there."""
    monkeypatch.setattr(llama.runtime.devices, "cpu_has_native_bf16", lambda: native)
    monkeypatch.delenv("LLAMA_DTYPE", raising=False)
    expected = torch.bfloat16 if native else torch.float32
    assert default_dtype(torch.device("cpu")) == expected
    assert resolve_dtype(None, torch.device("cpu")) == expected
    monkeypatch.setenv("LLAMA_DTYPE", "fp16")  # asked for: given
    assert resolve_dtype(None, torch.device("cpu")) == torch.float16


# ---- the engine in the default dtype ---------------------------------------------------------

@pytest.fixture(scope="module")
def default_generator(tiny_ckpt_mp2, sp_tokenizer):
    """The 2-shard tiny checkpoint merged into a world of one, dtype left to the engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLAMA_DTYPE")
        state = torch.get_rng_state()
        gen = Llama.build(str(tiny_ckpt_mp2), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu")
        torch.set_rng_state(state)
    return gen


def test_build_without_dtype_gets_the_default_and_exact_weights(default_generator, tiny_ckpt_mp2):
    model = default_generator.model
    assert model.norm.weight.dtype == DEFAULT_HERE
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_rank_weights(tiny_ckpt_mp2, False, shapes, 0, 1, DEFAULT_HERE)
    assert wrong_weights(model, expected) == []


def test_resharding_1_to_2_in_the_default_dtype_gives_exact_weights(tiny_ckpt, sp_tokenizer, monkeypatch):
    monkeypatch.delenv("LLAMA_DTYPE")
    for rank in range(2):
        with pose_as_rank(rank, 2):
            gen = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=16, max_batch_size=1, device="cpu")
        shapes = {k: tuple(v.shape) for k, v in gen.model.state_dict().items()}
        assert shapes["layers.0.attention.wq.weight"] == (32, 64)  # half of the 64 rows: really split
        expected = expected_rank_weights(tiny_ckpt, True, shapes, rank, 2, DEFAULT_HERE)
        assert wrong_weights(gen.model, expected) == [], f"rank {rank}"


def test_default_dtype_agrees_with_fp32_within_the_bound(default_generator, generator):
    """Log-probs of every position of each prompt: bf16 against the fp32 model, same weights."""
    worst_tv = worst_lp = 0.0
    for text in PROMPTS_FOR_DTYPE:
        ids = torch.tensor([generator.tokenizer.encode(text, bos=True, eos=False)])
        low = torch.log_softmax(default_generator.model(ids, 0)[0], -1)
        high = torch.log_softmax(generator.model(ids, 0)[0], -1)
        worst_tv = max(worst_tv, (low.exp() - high.exp()).abs().sum(-1).max().item() / 2)
        worst_lp = max(worst_lp, (low - high).abs().max().item())
    print(f"default dtype vs fp32: total variation {worst_tv:.3g}, |logprob diff| {worst_lp:.3g}")
    assert worst_tv < BF16_TV_BOUND and worst_lp < BF16_LOGPROB_BOUND
    if DEFAULT_HERE == torch.bfloat16:
        assert worst_lp > 0  # really another dtype


def test_default_dtype_streams_what_it_generates_as_valid_text(default_generator):
    gen = default_generator
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in PROMPTS_FOR_DTYPE]
    tokens, _ = gen.generate(prompts, max_gen_len=10, temperature=0, stop_tokens=[])
    steps = list(gen.stream_tokens(prompts, 10, temperature=0, stop_tokens=[]))
    streamed = [[s[i][0] for s in steps if s[i] is not None] for i in range(len(prompts))]
    assert streamed == tokens and all(len(t) == 10 for t in tokens)
    for text in PROMPTS_FOR_DTYPE:
        pieces = list(gen.stream_completion(text, temperature=0.8, top_p=0.9, max_gen_len=12))
        joined = "".join(pieces)
        joined.encode("utf-8")  # no lone surrogates: valid UTF-8 text
        assert all(isinstance(p, str) and p for p in pieces)


def test_default_dtype_batch_rows_agree_with_one_by_one(default_generator):
    """In bf16 a row's tokens may depend on its batch mates only through kernel rounding (a
    batch and a single row can take different matmul kernels): each row's greedy tokens equal
    its one-by-one tokens up to the first difference, and there the two runs' choices were a
    near tie in the one-by-one model's own logits (measured: all equal on an AMD EPYC and in
    runs of this file alone on an Intel Xeon with AMX, where one full-suite run saw a row part)."""
    gen = default_generator
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in PROMPTS_FOR_DTYPE]
    batch, _ = gen.generate(prompts, max_gen_len=10, temperature=0, stop_tokens=[])
    alone = [gen.generate([p], max_gen_len=10, temperature=0, stop_tokens=[])[0][0] for p in prompts]
    parted = 0
    for prompt, row, ref in zip(prompts, batch, alone):
        if row == ref:
            continue
        parted += 1
        first = next(i for i, (a, b) in enumerate(zip(row, ref)) if a != b)
        with torch.inference_mode():
            logits = gen.model(torch.tensor([prompt + ref[:first]]), 0)[0, -1].float()
        gap = (logits[ref[first]] - logits[row[first]]).item()
        print(f"a row parted at token {first}: logit gap {gap:.3g}")
        assert abs(gap) < BF16_TIE_GAP, (first, gap, row, ref)
    assert parted <= 1, (batch, alone)
