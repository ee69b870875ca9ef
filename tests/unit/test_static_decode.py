"""The fixed-shape decode step (llama.runtime.static_step), which CUDA graphs capture, run
here on the CPU in the same code without capture: it samples on the device exactly as sample()
does, gives the tokens of the engine's eager step (fp32, ragged, sampled, rows freed and taken
again), and reads nothing on the host inside a step."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers.precision import assert_same_completions as assert_same
from helpers.precision import switched_pair
from llama import Llama, LlamaError
from llama.runtime.engine import Request
from llama.runtime.sampling import request_key, sample, sample_fixed
from llama.runtime.static_step import StaticDecodeStep, bucket

PROMPTS = ["Once upon a time", "The capital of France is a city that", "1 2 3", "A long prompt, " * 12, "x",
           "Hello there my friend", "Numbers: 4 5 6 7", "Why?"]


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_fixed_shape_sampler_equals_sample_where_settled_and_says_where_not(kind):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(24, 3000, generator=g) * (8.0 if kind == "peaked" else 0.5)
    temperature = torch.tensor([0.0, 0.7, 1.3, 1e-45] * 6)
    top_p = torch.linspace(0.05, 1.0, 24)
    keys = torch.tensor([request_key("fixed", i) for i in range(24)])
    steps = torch.arange(24) * 3
    expected = sample(logits, temperature, top_p, keys, steps)
    for candidates in (64, 3000):
        tokens, settled = sample_fixed(logits, temperature, top_p, keys, steps, candidates)
        assert torch.equal(tokens[settled], expected[settled])
        assert bool(settled[temperature == 0].all())  # greedy rows never need the full sort
    # with every token a candidate each row is settled; a flat nucleus is not among 64
    assert bool(sample_fixed(logits, temperature, top_p, keys, steps, 3000)[1].all())
    assert kind == "peaked" or not bool(sample_fixed(logits, temperature, top_p, keys, steps, 64)[1].all())


def test_buckets_are_powers_of_two_within_the_limit():
    assert [bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert bucket(70, 100, least=64) == 100 and bucket(3, 512, least=64) == 64


@pytest.fixture(scope="module")
def pair(tiny_ckpt, sp_tokenizer):
    """The same fp32 weights with the fixed-shape step and with the eager one."""
    return switched_pair(tiny_ckpt, sp_tokenizer, "static_decode")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fixed_shape_step_gives_the_eager_steps_tokens(pair, temperature):
    """8 ragged prompts over 4 rows: rows finish and are taken again, busy rows stop being a
    prefix, free rows ride along; every request gets the eager step's tokens."""
    static, eager = pair
    passes = static.engine.stats.decode_passes
    got = static.text_completion(PROMPTS, temperature=temperature, max_gen_len=24, logprobs=True, seed=5)
    assert_same(got, eager.text_completion(PROMPTS, temperature=temperature, max_gen_len=24, logprobs=True,
                                           seed=5))
    assert static.engine.stats.decode_passes - passes >= 23
    assert static.engine._static_step() is not None and eager.engine._static_step() is None


def test_rows_whose_nucleus_is_not_among_the_candidates_are_sampled_again_alike(pair):
    static, eager = pair
    step = static.engine._static_step()
    step.candidates = 2  # few rows settle: the others take sample() on the step's logits
    try:
        got = static.text_completion(PROMPTS[:4], temperature=1.0, top_p=0.99, max_gen_len=12, logprobs=True,
                                     seed=6)
    finally:
        step.candidates = 256
    assert_same(got, eager.text_completion(PROMPTS[:4], temperature=1.0, top_p=0.99, max_gen_len=12,
                                           logprobs=True, seed=6))


def test_a_step_that_cannot_be_captured_runs_eagerly_with_the_same_tokens(pair, capsys):
    """Capture is not tried here (no CUDA); a failing capture is faked: the step says so once and
    runs eagerly from then on, with the tokens of the eager step."""
    static, eager = pair
    step = static.engine._static_step()

    def fail(size, length):
        raise RuntimeError("operation not permitted when stream is capturing")

    step.capture, step._capture = True, fail
    try:
        got = static.text_completion(PROMPTS[:3], temperature=0, max_gen_len=8, logprobs=True)
    finally:
        del step._capture
    assert not step.capture and step.replays == 0
    assert capsys.readouterr().err.count("could not be captured as a CUDA graph") == 1
    assert_same(got, eager.text_completion(PROMPTS[:3], temperature=0, max_gen_len=8, logprobs=True))


# What reads a tensor on the host (a synchronisation on a GPU).
HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy",
              "masked_select", "unique", "__array__"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor on the host, by name, and boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:2]))
        if name in HOST_READS or masked:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _flat(values):
    for v in values:
        if isinstance(v, (tuple, list)):
            yield from _flat(v)
        else:
            yield v


def test_a_step_reads_nothing_on_the_host_and_copies_its_results_back_once(pair):
    static, _ = pair
    engine = static.engine
    prompts = [static.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    handles = [engine.submit(Request(p, 8, temperature=0.7 * (i % 2), key=i)) for i, p in enumerate(prompts)]
    engine.step()  # prefill, first tokens and one decode step
    step = engine._static_step()
    calls = []
    original_run, original_call = StaticDecodeStep._run, StaticDecodeStep.__call__

    def watched_run(self, size, length):  # what a graph captures
        with HostReads() as spy:
            original_run(self, size, length)
        calls.append(("step", spy.seen))

    def watched_call(self, rows, kv_len):  # the step with its copies in and out
        with HostReads() as spy:
            out = original_call(self, rows, kv_len)
        calls.append(("call", spy.seen))
        return out

    step._run = watched_run.__get__(step)
    step.__class__ = type("Watched", (StaticDecodeStep,), {"__call__": watched_call})
    try:
        while not all(h.done for h in handles):
            engine.step()
    finally:
        step.__class__ = StaticDecodeStep
        del step._run
    inside = [seen for kind, seen in calls if kind == "step"]
    around = [seen for kind, seen in calls if kind == "call"]
    assert len(inside) >= 6 and all(seen == [] for seen in inside)
    assert all(seen == ["tolist"] for seen in around)  # the one device-to-host copy of the results


def test_non_finite_logits_in_a_fixed_shape_step_end_the_request_with_an_error(tiny_ckpt, sp_tokenizer):
    llama = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=2, device="cpu",
                        dtype="fp32", static_decode=True)
    engine = llama.engine
    handle = engine.submit(Request([1, 450, 7483], 8, temperature=0))
    engine.step()
    assert len(handle.tokens) == 2  # the prefill's token and one decode step's
    with torch.no_grad():
        llama.model.norm.weight.fill_(float("nan"))
    engine.step()
    assert handle.finish_reason == "error" and "NaN or inf" in str(handle.error)


def test_static_decode_takes_true_false_or_none(tiny_ckpt, sp_tokenizer):
    with pytest.raises(LlamaError, match="static_decode='yes'"):
        Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=2, device="cpu",
                    static_decode="yes")
