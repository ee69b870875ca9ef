"""Prompt-lookup speculative decoding (Engine(prompt_lookup_num_tokens=k)): greedy rows draft from
their own prompt and answer and keep what the model confirms; the tokens are those of decoding
one at a time. A steered model (a lookup table: after token a comes b) makes drafts that are
accepted, rejected half-way, and cut by stops and budgets, as planned."""

import pytest
import torch

from helpers.steering import steer_model
from llama import Llama

A, B, C, D, E, F = 319, 450, 2107, 4123, 1000, 1001
# After D, A (62%) or E (38%); every other step is all but certain (e^20 outweighs the 32000 others).
CHAIN = {A: {B: 20.0}, B: {C: 20.0}, C: {D: 20.0}, D: {A: 20.0, E: 19.5}, E: {F: 20.0}, F: {A: 20.0}}
P_A_AFTER_D = 1 / (1 + 2.718281828459045 ** -0.5)


def steered(tiny_ckpt, sp_tokenizer, dtype="fp32", max_batch_size=4, **kwargs):
    state = torch.get_rng_state()
    g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=96, max_batch_size=max_batch_size, device="cpu",
                    dtype=dtype, **kwargs)
    torch.set_rng_state(state)
    steer_model(g.model, CHAIN)
    return g


@pytest.fixture(scope="module")
def pair(tiny_ckpt, sp_tokenizer):
    return steered(tiny_ckpt, sp_tokenizer, prompt_lookup_num_tokens=5), steered(tiny_ckpt, sp_tokenizer)


# The prefill gives B (after A); then "A B" drafts what followed it in the prompt, E F C D A, but
# after B the model says C: that draft is rejected at once. From then on the chain C D A B repeats
# and the drafts from it are accepted.
PROMPT = [1, A, B, E, F, C, D, A]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_tokens_equal_decoding_one_at_a_time_with_fewer_passes(tiny_ckpt, sp_tokenizer, dtype):
    fast = steered(tiny_ckpt, sp_tokenizer, dtype, prompt_lookup_num_tokens=5)
    slow = steered(tiny_ckpt, sp_tokenizer, dtype)
    got = fast.generate([PROMPT], max_gen_len=30, temperature=0, logprobs=True, stop_tokens=[])
    expected = slow.generate([PROMPT], max_gen_len=30, temperature=0, logprobs=True, stop_tokens=[])
    assert got[0] == expected[0] and got[0][0][:5] == [B, C, D, A, B]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-4)
    stats = fast.engine.stats
    assert stats.draft_tokens > stats.draft_accepted > 20  # the first draft was rejected
    assert fast.engine.stats.decode_passes <= 10 < slow.engine.stats.decode_passes
    assert fast.last_stats.tokens_per_draft > 3 and "tokens per drafted step" in fast.last_stats.summary()


def test_budget_stop_tokens_and_stop_strings_cut_inside_a_draft(pair, sp_tokenizer):
    fast, slow = pair
    for kwargs in (dict(max_gen_len=7, stop_tokens=[]), dict(max_gen_len=30, stop_tokens=[A]),
                   dict(max_gen_len=30, stop_tokens=[])):
        got = fast.generate([PROMPT, PROMPT[:-1]], temperature=0, logprobs=True, **kwargs)
        assert got == slow.generate([PROMPT, PROMPT[:-1]], temperature=0, logprobs=True, **kwargs), kwargs
    assert len(got[0][0]) == 30
    text = slow.tokenizer.decode([C, D, A])
    stop = text[1:5]
    cut = fast.text_completion([fast.tokenizer.decode(PROMPT[1:])], temperature=0, max_gen_len=30, stop=[stop])
    assert cut == slow.text_completion([slow.tokenizer.decode(PROMPT[1:])], temperature=0, max_gen_len=30,
                                       stop=[stop])
    assert fast.engine.idle


def test_sampled_and_controlled_rows_decode_beside_drafting_rows(pair):
    """A greedy row with logit_bias does not draft; it runs in the drafting rows' pass and gets
    what it gets without prompt lookup."""
    fast, slow = pair
    for g in pair:
        g.engine.stats.drafted_rows = 0
    prompts = [PROMPT, PROMPT, [1, E, F, A]]
    got = fast.generate(prompts, max_gen_len=12, temperature=0, logprobs=True, stop_tokens=[])
    biased = dict(logit_bias={D: -20.0})
    assert fast.generate([PROMPT], max_gen_len=12, temperature=0, stop_tokens=[], **biased)[0] == \
        slow.generate([PROMPT], max_gen_len=12, temperature=0, stop_tokens=[], **biased)[0]
    sampled = fast.generate(prompts, max_gen_len=12, temperature=0.7, stop_tokens=[], seed=3)[0]
    assert all(len(t) == 12 for t in sampled)
    assert got == slow.generate(prompts, max_gen_len=12, temperature=0, logprobs=True, stop_tokens=[])
    assert fast.engine.stats.drafted_rows > 0


def test_sampled_rows_draft_and_get_the_very_samples_of_decoding_one_at_a_time(tiny_ckpt, sp_tokenizer):
    """A sampled row keeps a draft token when the race with its key picks it at that step (with
    the token's probability) and otherwise takes the race's own pick (a draw without it): the
    accept/reject rule, whose samples here are exactly those of decoding one token at a time.
    Over 200 keys, what follows D is A about 62% of the time, as the model says."""
    fast = steered(tiny_ckpt, sp_tokenizer, prompt_lookup_num_tokens=5, max_batch_size=64)
    slow = steered(tiny_ckpt, sp_tokenizer, max_batch_size=64)
    got = fast.generate([PROMPT] * 200, max_gen_len=12, temperature=1.0, top_p=1.0, stop_tokens=[], seed=11)[0]
    assert got == slow.generate([PROMPT] * 200, max_gen_len=12, temperature=1.0, top_p=1.0, stop_tokens=[],
                                seed=11)[0]
    stats = fast.engine.stats
    assert stats.draft_accepted > 500 and stats.draft_tokens > stats.draft_accepted  # kept and rejected
    after_d = [answer[answer.index(D) + 1] for answer in got if D in answer[:-1]]
    share = sum(t == A for t in after_d) / len(after_d)
    sigma = (P_A_AFTER_D * (1 - P_A_AFTER_D) / len(after_d)) ** 0.5
    assert set(after_d) == {A, E} and abs(share - P_A_AFTER_D) < 4 * sigma, (share, len(after_d))


def test_bad_values_are_named(tiny_ckpt, sp_tokenizer):
    from llama import LlamaError

    for bad in (-1, 65, 2.5, True):
        with pytest.raises(LlamaError, match=f"prompt_lookup_num_tokens={bad!r}"):
            Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1,
                        prompt_lookup_num_tokens=bad)


def test_the_cache_holds_what_the_engine_says_after_rejected_drafts(tiny_ckpt, sp_tokenizer):
    """On the random model (drafts mostly rejected) the keys and values a row holds are those of
    its prompt and answer, position by position, as a plain forward pass computes them: what the
    prefix cache will reuse."""
    fast = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=96, max_batch_size=2, device="cpu", dtype="fp32",
                       prompt_lookup_num_tokens=4)
    prompt = fast.tokenizer.encode("the cat and the dog and the cat and the dog and the", bos=True, eos=False)
    tokens = fast.generate([prompt], max_gen_len=24, temperature=0, stop_tokens=[])[0][0]
    stats = fast.engine.stats
    assert stats.drafted_rows and stats.draft_tokens > stats.draft_accepted
    content = fast.engine._content[0]
    assert content == prompt + tokens[:-1]  # the last token is not in the cache yet
    fresh = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=96, max_batch_size=1, device="cpu", dtype="fp32")
    fresh.model(torch.tensor([content]), 0)
    for ours, theirs in zip(fast.model.layers, fresh.model.layers):
        for name in ("k", "v"):
            torch.testing.assert_close(getattr(ours.attention.cache, name)[0, : len(content)],
                                       getattr(theirs.attention.cache, name)[0, : len(content)], rtol=0, atol=1e-4)


# ---- a draft model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    """Another tiny random model of the same shape and vocabulary: a draft that is mostly wrong."""
    from llama.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("draft"), seed=1)


@pytest.mark.parametrize("draft", ["itself", "another model"])
def test_a_draft_model_changes_the_speed_never_a_token(tiny_ckpt, other_ckpt, sp_tokenizer, draft):
    """With the model itself as its draft every draft is kept; with another model most are
    rejected; either way the tokens, greedy and sampled, are those of decoding one at a time."""
    path = str(tiny_ckpt if draft == "itself" else other_ckpt)
    fast = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=96, max_batch_size=4, device="cpu", dtype="fp32",
                       draft_ckpt_dir=path, num_assistant_tokens=4)
    slow = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=96, max_batch_size=4, device="cpu", dtype="fp32")
    prompts = [fast.tokenizer.encode(t, bos=True, eos=False) for t in ("Hello world", "The capital of France is",
                                                                       "Once upon a time, in a land far away,")]
    stats = fast.engine.stats
    for kwargs in (dict(temperature=0), dict(temperature=0.8, seed=4)):
        before = (stats.draft_tokens, stats.draft_accepted, stats.decode_passes, slow.engine.stats.decode_passes)
        got = fast.generate(prompts, max_gen_len=20, logprobs=True, stop_tokens=[], **kwargs)
        expected = slow.generate(prompts, max_gen_len=20, logprobs=True, stop_tokens=[], **kwargs)
        assert got[0] == expected[0], kwargs
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-4)
        drafted, kept = stats.draft_tokens - before[0], stats.draft_accepted - before[1]
        passes, plain_passes = stats.decode_passes - before[2], slow.engine.stats.decode_passes - before[3]
        assert drafted > 0
        if draft == "itself" and not kwargs["temperature"]:  # its own argmax: (all but) every draft kept
            assert kept >= 0.9 * drafted and passes <= plain_passes / 3
        elif draft != "itself":
            assert kept < drafted / 4


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_ckpt, sp_tokenizer, tmp_path):
    from llama import LlamaError
    from llama.testing import TINY_PARAMS, write_tiny_checkpoint

    small = write_tiny_checkpoint(tmp_path / "small", params={**TINY_PARAMS, "vocab_size": 1000})
    with pytest.raises(LlamaError, match=r"^draft_ckpt_dir='.*small'.*32000.*1000.*share the model's tokenizer"):
        Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1, draft_ckpt_dir=str(small))


def test_the_verifying_pass_runs_its_few_rows_on_the_measured_kernels(pair, monkeypatch):
    """PyTorch's GEMM reads the weights slowly at a few rows: the verifying pass's products go to
    native.linear (the kernel measured fastest for the shape); other passes keep F.linear."""
    from llama.model import parallel

    fast, slow = pair
    rows_seen = []
    real = parallel.native.linear

    def spy(x, packed, layout, kernel=None):
        rows_seen.append(x.numel() // x.shape[-1])
        return real(x, packed, layout, kernel)

    monkeypatch.setattr(parallel.native, "linear", spy)
    slow.generate([PROMPT, PROMPT], max_gen_len=8, temperature=0, stop_tokens=[])
    assert rows_seen == []
    fast.generate([PROMPT], max_gen_len=8, temperature=0, stop_tokens=[])
    assert rows_seen and all(1 < rows <= parallel.native.MAX_NATIVE_ROWS for rows in rows_seen)
    assert not parallel._SMALL_PRODUCTS_MEASURED[0]  # left as it was
