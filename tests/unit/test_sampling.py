"""Sampling that does not depend on batching (llama.runtime.sampling): the counter-based noise against
a plain-Python reference of its hash, the distribution it samples (statistical tests over a
fixed set of keys, so they are exact and repeatable), edge-case arguments, and the rule that a
call's draws come from the global torch RNG or its `seed`."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO
from llama import LlamaError
from llama.runtime.sampling import _hash32, check_sampling, nucleus, request_key, sample, sample_top_p, uniforms

N = 40000  # draws per distribution: a share's standard error is at most 0.0025


def _lowbias32(x: int) -> int:
    """The 32-bit mixer written with Python's unbounded ints (the published lowbias32 steps)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_hash_is_exact_integer_arithmetic():
    """The int64 tensor version (16-bit split multiplies) equals the unbounded-int reference,
    edge values included: no product overflowed, no sign crept in."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                        torch.randint(0, 2**32, (2000,), generator=g)])
    got = _hash32(values.clone()).tolist()
    assert got == [_lowbias32(v) for v in values.tolist()]
    assert all(0 <= v < 2**32 for v in got)


def test_noise_is_uniform_and_unrelated_across_tokens_keys_and_steps():
    keys = torch.tensor([request_key(7, i) for i in range(300)])
    steps = torch.zeros(300, dtype=torch.long)
    tokens = torch.arange(300).expand(300, 300)
    u = uniforms(keys, steps, tokens)
    assert float(u.min()) > 0 and float(u.max()) < 1
    hist = torch.histc(u, bins=20, min=0, max=1)
    chi2 = float(((hist - hist.mean()) ** 2 / hist.mean()).sum())
    assert chi2 < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom
    later = uniforms(keys, steps + 1, tokens)

    def corr(a, b):
        return abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]))

    # 90000 pairs each: an independent pair's correlation has standard error 1/300.
    assert corr(u[:, :-1], u[:, 1:]) < 0.015  # neighbouring token ids
    assert corr(u[:-1], u[1:]) < 0.015  # neighbouring keys
    assert corr(u, later) < 0.015  # successive steps


def _shares(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("top_p, expected", [
    (1.0, [0.05, 0.5, 0.15, 0.3]),
    (0.81, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),  # 0.5 + 0.3 < 0.81: the 0.15 token joins
    (0.79, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),
    (0.45, [0, 1, 0, 0]),
])
def test_sample_top_p_samples_the_nucleus_distribution(top_p, expected):
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).expand(N, 4)
    keys = torch.tensor([request_key("stat", i) for i in range(N)])
    draws = sample_top_p(probs, top_p, keys, torch.zeros(N, dtype=torch.long))
    shares = _shares(draws, 4)
    assert torch.allclose(shares, torch.tensor(expected, dtype=torch.float64), atol=0.012), shares


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (2.0, 0.6)])
def test_temperature_and_top_p_shape_the_distribution_as_specified(temperature, top_p):
    """softmax(logits / T), cut to its nucleus and renormalised, drawn over steps of one key."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, dim=0)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[before < top_p]] = probs[order[before < top_p]]
    expected = (kept / kept.sum()).double()
    rows = logits.expand(N, 6)
    draws = sample(rows, torch.full((N,), temperature), torch.full((N,), top_p),
                   torch.full((N,), request_key("temp", temperature, top_p)), torch.arange(N))
    assert torch.allclose(_shares(draws, 6), expected, atol=0.012), (_shares(draws, 6), expected)


def test_each_row_is_sampled_alone():
    """A row's token depends on its logits, arguments, key and step only: sampled one at a time,
    in another order or beside greedy rows, every row gets the same token."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 500, generator=g) * 3
    temperature = torch.tensor([0.7, 0.0, 1.3, 0.7, 1.0, 0.0, 0.5, 2.0, 0.9, 1.1, 0.3, 1e-45])
    top_p = torch.tensor([0.9, 0.9, 1.0, 0.5, 0.95, 0.2, 0.99, 0.8, 1e-300, 0.7, 1.0, 0.9])
    keys = torch.tensor([request_key("row", i) for i in range(12)])
    steps = torch.arange(12) * 5
    together = sample(logits, temperature, top_p, keys, steps)
    alone = torch.cat([sample(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], keys[i:i + 1],
                              steps[i:i + 1]) for i in range(12)])
    perm = torch.randperm(12, generator=g)
    shuffled = sample(logits[perm], temperature[perm], top_p[perm], keys[perm], steps[perm])
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[perm])
    assert together[1] == logits[1].argmax() and together[5] == logits[5].argmax()  # temperature 0
    assert together[11] == logits[11].argmax()  # temperature 1e-45: the one-hot of the argmax
    assert together[8] == logits[8].argmax()  # top_p 1e-300: the likeliest token alone


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
def test_nucleus_short_cut_equals_the_full_sort(kind):
    """The top-k short cut gives exactly the nucleus (and its order) the full sort gives,
    also where probs tie (bf16 logits tie often) and where it must fall back."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 3000, generator=g) * (8.0 if kind != "flat" else 0.3)
    if kind == "ties":
        logits = logits.to(torch.bfloat16).float().round()  # many exact ties
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.linspace(0.05, 1.0, 16)
    fast = nucleus(probs, top_p, candidates=64)
    full = nucleus(probs, top_p, candidates=probs.shape[-1])
    for a, b in zip(fast, full):
        assert torch.equal(a, b)


def test_extreme_arguments_never_give_nan_or_errors(generator):
    prompt = [1, 450, 7483, 310]
    greedy, _ = generator.generate([prompt], 6, temperature=0, stop_tokens=[])
    tiny_t, lps = generator.generate([prompt], 6, temperature=1e-45, top_p=0.9, logprobs=True, stop_tokens=[])
    assert tiny_t == greedy and all(math.isfinite(x) for x in lps[0])
    tiny_p, _ = generator.generate([prompt], 6, temperature=1.0, top_p=1e-300, stop_tokens=[])
    assert tiny_p == greedy  # the nucleus of the likeliest token alone
    huge_t, _ = generator.generate([prompt], 6, temperature=1e30, top_p=1.0, stop_tokens=[])
    assert len(huge_t[0]) == 6 and all(0 <= t < 32000 for t in huge_t[0])


def test_numpy_scalars_are_accepted():
    assert check_sampling(np.float32(0.5), np.float64(0.9), np.int64(7)) == (0.5, pytest.approx(0.9), 7)
    assert type(check_sampling(np.float32(0.5), 1, np.int32(3))[2]) is int


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature=nan must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature="0.5"), "temperature='0.5'"),
    (dict(top_p=float("nan")), r"top_p=nan must be a finite number in \(0, 1\]"),
    (dict(top_p=np.float32(0.0)), "top_p=0.0"),
    (dict(max_gen_len=np.float64(3.0)), "max_gen_len=3.0 must be an integer >= 1"),
    (dict(temperature=True), "temperature=True"),
])
def test_bad_sampling_arguments_are_refused_clearly(generator, kwargs, match):
    with pytest.raises(LlamaError, match=match):
        generator.text_completion(["hi"], **{"max_gen_len": 4, **kwargs})


def test_calls_draw_fresh_keys_from_the_global_rng_or_from_seed(generator):
    prompts = ["Once upon a time", "The capital of France is"]

    def draw(**kwargs):
        return generator.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=12, **kwargs)

    torch.manual_seed(3)
    first, second = draw(), draw()
    assert first != second  # successive calls sample afresh
    torch.manual_seed(3)
    assert draw() == first  # a seeded global RNG reproduces a call
    torch.manual_seed(99)
    by_seed = draw(seed=5)
    torch.manual_seed(3)
    assert draw(seed=5) == by_seed  # seed= ignores the global RNG
    assert draw(seed=6) != by_seed
    state = torch.get_rng_state()
    generator.text_completion(prompts, temperature=0, max_gen_len=4)
    assert torch.equal(torch.get_rng_state(), state)  # greedy calls draw nothing, as Meta's
    with pytest.raises(LlamaError, match="seed='x' must be an integer"):
        draw(seed="x")


@pytest.mark.subprocess
def test_request_key_is_stable_across_processes():
    """Keys never come from Python's salted hash(): other processes with other hash seeds
    (other ranks, a resumed job) make the same keys."""
    code = "from llama.runtime.sampling import request_key; print(request_key(1, 'a'), request_key(7, 3))"
    seen = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(salt), PYTHONPATH=str(REPO))).stdout
            for salt in (1, 2)}
    assert seen == {f"{request_key(1, 'a')} {request_key(7, 3)}\n"}
    assert request_key(1, '"a"') != request_key(1, "1") != request_key("1", "1") != request_key("1", 1)
    assert all(0 <= request_key(i) < 2**63 for i in range(100))


# ---- sampling controls (top_k, min_p, penalties, logit_bias) -------------------------------------

def _sample_with(logits, temperature, top_p, keys, steps, min_p, top_k):
    n = logits.shape[0]
    return sample(logits, torch.full((n,), temperature) if isinstance(temperature, float) else temperature,
                  torch.full((n,), top_p) if isinstance(top_p, float) else top_p, keys, steps,
                  torch.as_tensor(min_p, dtype=torch.float32).expand(n).clone(),
                  torch.as_tensor(top_k, dtype=torch.long).expand(n).clone())


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "tiny_temperature"])
def test_rows_without_controls_sample_as_before_whatever_their_batch_mates(kind):
    """The controls' path (min_p/top_k given) leaves a row without controls exactly as the
    plain path samples it, beside rows that cut and rows that do not: same tokens, bit for bit."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(24, 3000, generator=g) * (8.0 if kind != "flat" else 0.3)
    if kind == "ties":
        logits = logits.to(torch.bfloat16).float().round()
    temperature = torch.full((24,), 1e-30 if kind == "tiny_temperature" else 0.9)
    temperature[::5] = 0.0
    top_p = torch.linspace(0.05, 1.0, 24)
    keys = torch.tensor([request_key("off", i) for i in range(24)])
    plain = torch.stack([sample(logits, temperature, top_p, keys, torch.full((24,), s)) for s in range(20)])
    min_p, top_k = torch.zeros(24), torch.zeros(24, dtype=torch.long)
    min_p[1::3], top_k[2::3] = 0.2, 5  # rows 0, 3, 6, ... have no cut
    with_mates = torch.stack([sample(logits, temperature, top_p, keys, torch.full((24,), s), min_p, top_k)
                              for s in range(20)])
    off = torch.stack([sample(logits, temperature, top_p, keys, torch.full((24,), s), torch.zeros(24),
                              torch.zeros(24, dtype=torch.long)) for s in range(20)])
    assert torch.equal(off, plain)
    assert torch.equal(with_mates[:, 0::3], plain[:, 0::3])
    if kind == "flat":  # wide nuclei: the cuts change draws
        assert not torch.equal(with_mates[:, 1::3], plain[:, 1::3])


def test_rows_with_controls_are_sampled_alone():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(10, 700, generator=g) * 3
    temperature = torch.tensor([0.7, 1.3, 0.0, 1.0, 2.0, 0.5, 1.0, 1.1, 0.9, 1.0])
    top_p = torch.tensor([0.9, 1.0, 0.9, 0.5, 0.95, 1.0, 0.8, 1.0, 0.99, 1.0])
    min_p = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.01, 0.5, 0.0, 1.0, 0.1, 0.0])
    top_k = torch.tensor([0, 10, 3, 0, 50, 0, 1, 0, 2000, 0])
    keys = torch.tensor([request_key("ctl", i) for i in range(10)])
    steps = torch.arange(10) * 3
    together = sample(logits, temperature, top_p, keys, steps, min_p, top_k)
    alone = torch.cat([sample(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], keys[i:i + 1],
                              steps[i:i + 1], min_p[i:i + 1], top_k[i:i + 1]) for i in range(10)])
    perm = torch.randperm(10, generator=g)
    shuffled = sample(logits[perm], temperature[perm], top_p[perm], keys[perm], steps[perm], min_p[perm], top_k[perm])
    assert torch.equal(together, alone) and torch.equal(shuffled, together[perm])
    # top_k=1 and min_p=1 leave the likeliest token alone, at any temperature
    assert together[6] == logits[6].argmax() and together[7] == logits[7].argmax()


@pytest.mark.parametrize("min_p, top_k, top_p, expected", [
    # probs 0.05, 0.5, 0.15, 0.3 (logits their logs, T = 1)
    (0.0, 2, 1.0, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),
    (0.0, 3, 0.7, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),  # top_p over the renormalised three: 0.52 + 0.32 > 0.7
    (0.0, 2, 0.6, [0, 1, 0, 0]),  # renormalised, 0.5 / 0.8 = 0.625 already reaches 0.6
    (0.25, 0, 1.0, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),  # keeps prob >= 0.125
    (0.4, 0, 1.0, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),  # keeps prob >= 0.2
    (0.25, 2, 1.0, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),
    (0.0, 10, 1.0, [0.05, 0.5, 0.15, 0.3]),  # k beyond the vocabulary: all
])
def test_min_p_and_top_k_shape_the_distribution_as_specified(min_p, top_k, top_p, expected):
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(N, 4)
    keys = torch.tensor([request_key("cut", i) for i in range(N)])
    draws = _sample_with(logits, 1.0, top_p, keys, torch.zeros(N, dtype=torch.long), min_p, top_k)
    assert torch.allclose(_shares(draws, 4), torch.tensor(expected, dtype=torch.float64), atol=0.012)


def test_control_state_adjusts_its_row_as_specified():
    """logit_bias added, then the repetition penalty over prompt and generated tokens, then
    presence and frequency over generated tokens only (the formulas written out here)."""
    from llama.runtime.sampling import ControlState, SamplingControls

    controls = SamplingControls.checked(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                                        logit_bias={3: 5.0, "7": -1.5})
    state = ControlState(controls, [1, 2, 2], 10, torch.device("cpu"))
    for token in (4, 4, 7, 4):
        state.add(token)
    logits = torch.tensor([1.0, -2.0, 3.0, -1.0, 0.5, 2.0, -0.5, 1.0, 4.0, 0.0])
    row = logits.clone()
    state.adjust(row)
    expected = logits.tolist()
    expected[3] += 5.0
    expected[7] -= 1.5
    for t in (1, 2, 4, 7):  # seen: divided when positive, multiplied when negative
        expected[t] = expected[t] / 2 if expected[t] > 0 else expected[t] * 2
    expected[4] -= 0.25 * 3 + 0.5
    expected[7] -= 0.25 * 1 + 0.5
    assert row.tolist() == pytest.approx(expected, abs=1e-6)
    extreme = ControlState(SamplingControls(repetition_penalty=1e-38), [0, 1], 10, torch.device("cpu"))
    row = logits.clone() * 1e3
    extreme.adjust(row)
    assert bool(torch.isfinite(row).all())  # 1000 / 1e-38 overflows: kept finite


def test_sampling_controls_checked_and_their_defaults():
    from llama.runtime.sampling import SamplingControls

    assert SamplingControls.checked() == SamplingControls() and not SamplingControls().active
    c = SamplingControls.checked(np.int64(40), np.float32(0.05), -2, 2.0, np.float64(1.3),
                                 {"50": 1, 7: np.float32(-100)}, vocab_size=51)
    assert c == SamplingControls(40, pytest.approx(0.05), -2.0, 2.0, pytest.approx(1.3), ((7, -100.0), (50, 1.0)))
    assert type(c.top_k) is int and type(c.min_p) is float and c.active
    assert SamplingControls.checked(logit_bias=[(9, 2), [3, 1.5]]).logit_bias == ((3, 1.5), (9, 2.0))
    for one in (dict(top_k=1), dict(min_p=0.1), dict(presence_penalty=-0.1), dict(frequency_penalty=0.1),
                dict(repetition_penalty=0.9), dict(logit_bias={1: 0.0})):
        assert SamplingControls.checked(**one).active, one


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(top_k=2.5), "top_k=2.5 must be an integer"),
    (dict(top_k=True), "top_k=True must be an integer"),
    (dict(min_p=1.5), "min_p=1.5 must be a finite number from 0 to 1"),
    (dict(min_p=float("nan")), "min_p=nan"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5 must be a finite number from -2 to 2"),
    (dict(presence_penalty=False), "presence_penalty=False"),
    (dict(frequency_penalty=-3), "frequency_penalty=-3 must be a finite number from -2 to 2"),
    (dict(repetition_penalty=0), r"repetition_penalty=0 must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf"),
    (dict(logit_bias=[1, 2]), r"logit_bias=\[1, 2\] must be a dict of token id -> bias"),
    (dict(logit_bias={"a1": 1}), "logit_bias key='a1' must be an integer"),
    (dict(logit_bias={-1: 1}), "logit_bias key=-1 must be an integer"),
    (dict(logit_bias={32000: 1}, vocab_size=32000), "logit_bias key=32000 must be an integer from 0 to 31999"),
    (dict(logit_bias={5: 101}), r"logit_bias value=101 must be a finite number from -100 to 100 \(for token 5\)"),
    (dict(logit_bias={5: "1"}), "logit_bias value='1'"),
    (dict(logit_bias={5: 1, "5": 2}), "logit_bias key=5 is given twice"),
    (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias has 301 entries; at most 300"),
    (dict(top_k=-1, where="prompt 3: "), "^prompt 3: top_k=-1"),
    (dict(min_p=2, where="--"), "^--min_p=2"),
])
def test_bad_sampling_controls_are_named(kwargs, match):
    from llama.runtime.sampling import SamplingControls

    with pytest.raises(LlamaError, match=match):
        SamplingControls.checked(**kwargs)


def test_cut_tokens_leave_the_nucleus_short(monkeypatch):
    """Tokens that min_p / top_k left out are not nucleus members, even at top_p=1: the race
    then hashes noise for the few kept tokens, not for the whole vocabulary."""
    import llama.runtime.sampling as sampling

    widths = []
    race = sampling.race
    monkeypatch.setattr(sampling, "race", lambda ids, *rest: widths.append(ids.shape[1]) or race(ids, *rest))
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(6))
    keys = torch.tensor([request_key("short", i) for i in range(4)])
    _sample_with(logits, 1.0, 1.0, keys, torch.zeros(4, dtype=torch.long), 0.0, 3)
    _sample_with(logits, 1.0, 1.0, keys, torch.zeros(4, dtype=torch.long), 0.5, 0)
    assert widths[0] == 3 and widths[1] < 20
