"""Sampling controls against HF transformers' logits processors (references no one here wrote):
which tokens the sampler can draw under min_p, top_k and top_p (HF's MinPLogitsWarper, then
TopKLogitsWarper, then TopPLogitsWarper on logits / T), how often it draws each (HF's chain
renormalised), the repetition penalty (RepetitionPenaltyLogitsProcessor), logit_bias (a plain
add, as HF's SequenceBiasLogitsProcessor for one-token sequences), and OpenAI's presence and
frequency formula written out here. Then the same through the whole engine: greedy chains of
full forward passes, and a model steered by hand (helpers/steering.py) sampled with controls."""

import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper)

from helpers.steering import SOURCE, TOP, steered_tiny
from llama.runtime.sampling import ControlState, SamplingControls, request_key, sample

DRAWS = 4000  # per row; the rarest member of a row below is drawn ~8 times on average or more


def _hf_warped(logits: torch.Tensor, temperature: float, top_p: float, min_p: float, top_k: int) -> torch.Tensor:
    """logits [B, V] through HF's warpers in the order the specification gives: min_p, top_k, top_p."""
    scores = logits / temperature
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores


@pytest.mark.parametrize("temperature, top_p, min_p, top_k", [
    (1.0, 1.0, 0.05, 0), (1.0, 1.0, 0.0, 7), (0.7, 0.9, 0.0, 12), (1.3, 0.8, 0.02, 20),
    (1.0, 0.95, 0.1, 5), (2.0, 0.6, 0.0, 0), (0.5, 1.0, 0.01, 3),
])
def test_the_tokens_drawn_are_those_hf_warpers_keep_and_as_often(temperature, top_p, min_p, top_k):
    g = torch.Generator().manual_seed(int(temperature * 100 + top_p * 10 + top_k))
    rows = 3
    logits = torch.randn(rows, 60, generator=g) * 2
    warped = _hf_warped(logits, temperature, top_p, min_p, top_k)
    allowed = [set(torch.isfinite(w).nonzero().flatten().tolist()) for w in warped]
    expected = torch.softmax(warped, dim=-1).double()

    many = logits.repeat_interleave(DRAWS, dim=0)
    n = many.shape[0]
    keys = torch.tensor([request_key("hf", i) for i in range(n)])
    draws = sample(many, torch.full((n,), temperature), torch.full((n,), top_p), keys,
                   torch.zeros(n, dtype=torch.long), torch.full((n,), min_p), torch.full((n,), top_k))
    for r in range(rows):
        mine = draws[r * DRAWS: (r + 1) * DRAWS]
        assert set(mine.tolist()) == allowed[r], (r, sorted(set(mine.tolist()) ^ allowed[r]))
        shares = torch.bincount(mine, minlength=60).double() / DRAWS
        assert torch.allclose(shares, expected[r], atol=0.03), (shares - expected[r]).abs().max()
    assert 2 <= min(len(a) for a in allowed) < 60  # the cuts left choices, and cut something


def test_repetition_penalty_and_bias_equal_hf_processors_and_openai_penalties_their_formula():
    """ControlState on random logits: bias (HF's SequenceBias for one-token sequences), then the
    repetition penalty over prompt + generated (HF's processor, bit for bit), then OpenAI's
    `logit -= frequency_penalty * count + presence_penalty * (count > 0)` over generated tokens."""
    g = torch.Generator().manual_seed(8)
    vocab, prompt, generated = 300, [5, 9, 9, 120, 7], [7, 42, 42, 42, 250, 9]
    bias = {42: 3.5, 8: -20.0, 299: 0.75}
    for rep, presence, frequency in [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.6, 0.3), (1.8, -0.5, 1.2)]:
        logits = torch.randn(1, vocab, generator=g) * 4
        controls = SamplingControls.checked(presence_penalty=presence, frequency_penalty=frequency,
                                            repetition_penalty=rep, logit_bias=bias)
        state = ControlState(controls, prompt, vocab, torch.device("cpu"))
        for t in generated:
            state.add(t)
        mine = logits[0].clone()
        state.adjust(mine)

        ids = torch.tensor([prompt + generated])
        ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(ids, logits.clone())
        if rep != 1:
            ref = RepetitionPenaltyLogitsProcessor(rep)(ids, ref)
        if not (presence or frequency):
            assert torch.equal(mine, ref[0]), (rep, (mine - ref[0]).abs().max())
        counts = torch.bincount(torch.tensor(generated), minlength=vocab).float()  # generated only
        ref = ref[0] - (frequency * counts + presence * (counts > 0).float())
        assert torch.allclose(mine, ref, atol=1e-6, rtol=0), (rep, presence, frequency)


# ---- through the engine ------------------------------------------------------------------------

def _greedy_chain(model, prompt, steps, bias, rep, presence, frequency):
    """Greedy decoding by full forward passes, each step's logits adjusted by HF's processors
    and OpenAI's formula (not by llama.runtime.sampling)."""
    chain = list(prompt)
    vocab = model.params.vocab_size
    for _ in range(steps):
        logits = model(torch.tensor([chain]), 0)[:, -1].float()
        ids = torch.tensor([chain])
        logits = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(ids, logits)
        logits = RepetitionPenaltyLogitsProcessor(rep)(ids, logits)
        counts = torch.bincount(torch.tensor(chain[len(prompt):] or [0]), minlength=vocab).float()
        if len(chain) == len(prompt):
            counts.zero_()
        logits = logits[0] - (frequency * counts + presence * (counts > 0).float())
        chain.append(int(logits.argmax()))
    return chain[len(prompt):]


def test_greedy_with_controls_is_the_chain_of_hf_processed_full_forwards(generator):
    """Each prompt alone and in one batch with others of other controls (fp32): the tokens are the
    greedy chain of uncached forward passes adjusted by the references. A bias pushes a token
    the model would repeat; the penalties must pull it back."""
    tok = generator.tokenizer
    texts = ["Once upon a time", "The capital of France is", "Hello world"]
    prompts = [tok.encode(t, bos=True, eos=False) for t in texts]
    favourite = generator.generate(prompts[:1], 1, temperature=0, stop_tokens=[])[0][0][0]
    settings = [dict(logit_bias={favourite: 15.0}, repetition_penalty=1.0),
                dict(logit_bias={favourite: 15.0}, repetition_penalty=3.0, frequency_penalty=1.0),
                dict(logit_bias={favourite: 15.0, 450: 2.0}, presence_penalty=2.0, frequency_penalty=0.5,
                     repetition_penalty=1.2)]
    results = []
    for s in settings:
        expected = [_greedy_chain(generator.model, p, 10, s["logit_bias"], s.get("repetition_penalty", 1.0),
                                  s.get("presence_penalty", 0.0), s.get("frequency_penalty", 0.0)) for p in prompts]
        got = generator.generate(prompts, 10, temperature=0, stop_tokens=[], **s)[0]
        assert got == expected, s
        results.append(got)
    assert results[0][0].count(favourite) >= 8  # the bias alone: the favourite over and over
    assert results[1][0].count(favourite) <= 3 and results[2][0] != results[0][0]  # the penalties act


N = 1200


@pytest.fixture(scope="module")
def steered(tiny_ckpt, sp_tokenizer):
    return steered_tiny(tiny_ckpt, sp_tokenizer)


@pytest.mark.parametrize("prompt, temperature, top_p, controls", [
    ([1, SOURCE], 1.0, 1.0, dict(top_k=2)),
    ([1, SOURCE], 0.8, 1.0, dict(min_p=0.3)),
    # 319 was in the prompt: 12 -> 8; the nucleus of 0.75 then ends after it (0.46, 0.28, 0.02)
    ([1, 319, SOURCE], 1.0, 0.75, dict(repetition_penalty=1.5)),
    ([1, SOURCE], 1.0, 1.0, dict(logit_bias={4123: 2.0}, top_k=3, min_p=0.1)),
])
def test_the_engine_samples_what_hf_processors_specify(steered, prompt, temperature, top_p, controls):
    """The next-token logits are known (steered); the expected shares are HF's chain (bias,
    repetition penalty, temperature, min_p, top_k, top_p) on them, softmaxed."""
    vocab = steered.model.params.vocab_size
    scale = math.sqrt(1 / (1 + 1e-5 * 64))  # the final RMSNorm's eps, seen by a unit embedding (dim 64)
    logits = torch.zeros(1, vocab)
    for t, v in TOP.items():
        logits[0, t] = v * scale
    ids = torch.tensor([prompt])
    if "logit_bias" in controls:
        logits = SequenceBiasLogitsProcessor([[[t], b] for t, b in controls["logit_bias"].items()])(ids, logits)
    logits = RepetitionPenaltyLogitsProcessor(controls.get("repetition_penalty", 1.0))(ids, logits)
    warped = _hf_warped(logits, temperature, top_p, controls.get("min_p", 0.0), controls.get("top_k", 0))
    expected = torch.softmax(warped[0], dim=-1)
    assert float(expected[list(TOP)].sum()) > 0.999  # the 31997 others are cut: a short nucleus

    tokens, _ = steered.generate([prompt] * N, max_gen_len=1, temperature=temperature, top_p=top_p,
                                 stop_tokens=[], seed=13, **controls)
    firsts = [t[0] for t in tokens]
    for t in TOP:
        assert abs(firsts.count(t) / N - float(expected[t])) < 0.05, (t, firsts.count(t) / N, expected[t])
    assert set(firsts) == {t for t in TOP if expected[t] > 0}
