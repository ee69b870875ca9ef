"""Sampling through the whole engine (Llama.generate -> engine -> sampler), on a model whose
next-token logits are set by hand (conftest.steer_model), so that the expected distribution is
computed here from the specification, softmax(logits / T) cut to its top_p nucleus and
renormalised, independently of llama.runtime.sampling. Fixed seeds: the tests are repeatable."""

import math

import pytest
import torch

from helpers.steering import SOURCE, TOP, steered_tiny
from llama.runtime.sampling import uniforms

N = 1200  # identical prompts per call: a share's standard error is at most 0.0145
TOLERANCE = 0.05
VOCAB = 32000


@pytest.fixture(scope="module")
def steered(tiny_ckpt, sp_tokenizer):
    return steered_tiny(tiny_ckpt, sp_tokenizer)


def _expected(temperature: float, top_p: float) -> dict:
    """Shares of the three likely tokens and of all others together, by the specification."""
    scale = math.sqrt(1 / (1 + 1e-5 * 64))  # the final RMSNorm's eps, seen by a unit embedding (dim 64)
    logits = {t: v * scale / temperature for t, v in TOP.items()}
    z = sum(math.exp(v) for v in logits.values()) + (VOCAB - len(TOP))
    probs = sorted(((math.exp(v) / z, t) for t, v in logits.items()), reverse=True)
    kept, before = {}, 0.0
    for p, t in probs + [(1 / z, "other")]:  # one "other" token stands for any of them: all tie
        if before < top_p:
            kept[t] = p if t != "other" else 1 - sum(x for x, _ in probs)  # all others together
        before += p
    total = sum(kept.values())
    return {t: kept.get(t, 0.0) / total for t in [*TOP, "other"]}


# top_p below the three likely tokens' mass keeps the 31997 tied others out of the nucleus (with
# them in, every row hashes noise for the whole vocabulary, seconds per call); the statistical
# tests in test_sampling.py cover a whole-vocabulary nucleus on small vocabularies.
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.85), (0.5, 0.99), (1.0, 0.7)])
def test_generate_samples_the_specified_distribution(steered, temperature, top_p):
    tokens, _ = steered.generate([[1, SOURCE]] * N, max_gen_len=1, temperature=temperature, top_p=top_p,
                                 stop_tokens=[], seed=11)
    firsts = [t[0] for t in tokens]
    shares = {t: firsts.count(t) / N for t in TOP}
    shares["other"] = 1 - sum(shares.values())
    expected = _expected(temperature, top_p)
    for key in expected:
        assert abs(shares[key] - expected[key]) < TOLERANCE, (key, shares, expected)


def test_every_step_draws_new_noise(steered):
    """After an unsteered token all 32000 tokens are equally likely: 16 steps of one request
    give (almost surely) 16 different tokens; the same noise at every step would repeat one."""
    tokens, _ = steered.generate([[1, 2]], max_gen_len=16, temperature=1.0, top_p=1.0, stop_tokens=[], seed=5)
    assert len(set(tokens[0])) >= 14


def test_keys_differing_only_in_their_high_bits_draw_different_noise():
    low = torch.tensor([12345, 12345, 12345])
    keys = low + torch.tensor([0, 1 << 32, 1 << 40])
    u = uniforms(keys, torch.zeros(3, dtype=torch.long), torch.arange(64).expand(3, 64))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2]) and not torch.equal(u[1], u[2])
