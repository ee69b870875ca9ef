"""Prefix caching (llama.runtime.engine): a prompt whose beginning is already in a cache row
prefills only the rest, and gets what a run without reuse gets: the same tokens, logprobs
within fp32 rounding (the reused positions were computed in another pass shape)."""

import pytest
import torch

from helpers.precision import FP32_LOGPROB_TOLERANCE as LOGPROB_TOLERANCE
from helpers.precision import assert_same_completions as assert_same
from helpers.precision import switched_pair
from llama import Llama
SYSTEM = "You are a terse assistant who answers in one word, always, whatever the question is. " * 2


@pytest.fixture(scope="module")
def pair(tiny_ckpt, sp_tokenizer):
    """The same weights twice (fp32): with the prefix cache, and without."""
    return switched_pair(tiny_ckpt, sp_tokenizer, "prefix_cache")


def test_each_turn_of_a_chat_reuses_the_last_and_answers_alike(pair):
    cached, plain = pair
    dialog = [{"role": "system", "content": SYSTEM}]
    before, previous = cached.engine.stats.prefix_reused, 0
    for turn in range(4):
        dialog.append({"role": "user", "content": f"Question {turn}: what comes next?"})
        got = cached.chat_completion([dialog], temperature=0, max_gen_len=12, logprobs=True)
        assert_same(got, plain.chat_completion([dialog], temperature=0, max_gen_len=12, logprobs=True))
        reused = cached.engine.stats.prefix_reused - before
        before += reused
        if turn:  # the previous turn's prompt is in the row already (its answer, re-encoded, may differ)
            assert reused >= previous - 1, (turn, reused, previous)
        previous = len(cached.formatter.encode_dialog_prompt(dialog))
        dialog.append(got[0]["generation"])
    assert plain.engine.stats.prefix_reused == 0


def test_a_continuation_reuses_the_generated_tokens_too(pair):
    cached, plain = pair
    prompt = cached.tokenizer.encode("A continuation, token by token:", bos=True, eos=False)
    tokens = cached.generate([prompt], max_gen_len=20, temperature=0, stop_tokens=[])[0][0]
    follow = prompt + tokens + [450]
    reused = cached.engine.stats.prefix_reused
    got = cached.generate([follow], max_gen_len=8, temperature=0, logprobs=True, stop_tokens=[])
    assert cached.engine.stats.prefix_reused - reused == len(prompt) + len(tokens) - 1  # the last was not decoded
    expected = plain.generate([follow], max_gen_len=8, temperature=0, logprobs=True, stop_tokens=[])
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=LOGPROB_TOLERANCE)


def test_prompts_sharing_a_system_prompt_prefill_it_once_per_row_and_answer_alike(pair):
    cached, plain = pair
    prompts = [SYSTEM + f"Item {i}: the next word is" for i in range(10)]
    shared = len(cached.tokenizer.encode(SYSTEM, bos=True, eos=False)) - 1
    stats = cached.engine.stats
    filled_before, reused_before = stats.prefill_tokens, stats.prefix_reused
    got = cached.text_completion(prompts, temperature=0, max_gen_len=6, logprobs=True)
    assert_same(got, plain.text_completion(prompts, temperature=0, max_gen_len=6, logprobs=True))
    total = sum(len(cached.tokenizer.encode(p, bos=True, eos=False)) for p in prompts)
    # the first prompt prefills the system prompt; the other 3 rows copy it, later prompts reuse a row
    assert stats.prefix_reused - reused_before >= 9 * shared
    assert stats.prefill_tokens - filled_before <= total - 9 * shared


def test_several_samples_of_one_prompt_prefill_it_once(pair):
    """Copies of one prompt admitted together: the first prefills it, the others wait a step and
    copy its row; each still samples with its own key, as it would alone."""
    cached, plain = pair
    prompt = cached.tokenizer.encode("Nothing cached begins like this: a story of dragons, knights, castles and "
                                     "the long winter that came after them.", bos=True, eos=False)
    stats = cached.engine.stats
    filled_before, copied_before = stats.prefill_tokens, stats.prefix_copied
    got = cached.generate([prompt] * 4, max_gen_len=8, temperature=1.0, logprobs=True, seed=5)
    expected = plain.generate([prompt] * 4, max_gen_len=8, temperature=1.0, logprobs=True, seed=5)
    assert got[0] == expected[0] and len({tuple(t) for t in got[0]}) > 1  # different samples
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=LOGPROB_TOLERANCE)
    assert stats.prefill_tokens - filled_before <= len(prompt) + 3  # once, then the last token per copy
    assert stats.prefix_copied - copied_before == 3 * (len(prompt) - 1)


def test_a_free_row_riding_along_in_decode_keeps_its_cached_prefix(pair, monkeypatch):
    """A finished short request leaves its prefix in row 0 while a long one decodes in row 1
    with PyTorch's forward over rows 0..1 (row 0 rides along); row 0's prefix is still right."""
    from llama.runtime.engine import Request

    cached, plain = pair
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    short = cached.tokenizer.encode(SYSTEM + "Short.", bos=True, eos=False)
    long = cached.tokenizer.encode("A long answer, please:", bos=True, eos=False)
    for g in pair:
        g.generate([[1, 2]] * 4, max_gen_len=1, temperature=0)  # nothing useful cached
        done = dict(g.complete([Request(short, 2, 0.0), Request(long, 40, 0.0)]))
        assert done[0].tokens and len(done[1].tokens) == 40 or done[1].finish_reason == "stop"
    reused = cached.engine.stats.prefix_reused
    follow = short + [450, 319, 2107]
    got = cached.generate([follow], max_gen_len=10, temperature=0, logprobs=True, stop_tokens=[])
    assert cached.engine.stats.prefix_reused - reused >= len(short)  # row 0's prefix was used
    expected = plain.generate([follow], max_gen_len=10, temperature=0, logprobs=True, stop_tokens=[])
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=LOGPROB_TOLERANCE)


def test_a_forward_pass_outside_the_engine_voids_the_cached_prefixes(pair):
    """Meta's own decode loop calls generator.model directly, writing rows from 0: the engine
    notices and reuses nothing it cannot trust."""
    cached, plain = pair
    prompt = cached.tokenizer.encode(SYSTEM + "Once more.", bos=True, eos=False)
    cached.generate([prompt], max_gen_len=4, temperature=0)
    with torch.inference_mode():
        cached.model(torch.randint(0, 32000, (4, len(prompt))), 0)  # overwrites every row's start
    reused = cached.engine.stats.prefix_reused
    got = cached.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
    assert cached.engine.stats.prefix_reused == reused
    assert got == plain.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)


def test_the_switch_turns_it_off_and_bad_values_are_named(tiny_ckpt, sp_tokenizer, pair):
    cached, plain = pair
    assert cached.engine.prefix_cache and not plain.engine.prefix_cache
    from llama import LlamaError

    with pytest.raises(LlamaError, match="prefix_cache='yes' must be True or False"):
        Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1, prefix_cache="yes")


# ---- n samples of one prompt in the library ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "default"])
def test_n_samples_are_prefilled_once_and_each_is_what_its_key_gives_alone(tiny_ckpt, sp_tokenizer, dtype,
                                                                          monkeypatch):
    """text_completion(n=3): per prompt a list of 3, sample j of prompt i sampled with the key of
    position i * 3 + j (as the server's choices), each equal to its request run alone; the prompt
    prefilled once per call."""
    from llama.detokenize import token_texts
    from llama.runtime.engine import Request
    from llama.runtime.sampling import request_key

    if dtype == "default":
        monkeypatch.delenv("LLAMA_DTYPE", raising=False)
    g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=128, max_batch_size=4, device="cpu",
                    dtype=None if dtype == "default" else dtype)
    prompts = ["A prompt long enough to be worth sharing between the samples of it, twice over.",
               "Another one, different from its first token on, and also long enough to share."]
    stats = g.engine.stats
    before = stats.prefill_tokens
    out = g.text_completion(prompts, temperature=1.0, max_gen_len=6, logprobs=True, seed=9, n=3)
    lengths = [len(g.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    assert stats.prefill_tokens - before <= sum(lengths) + 2 * 2  # each prompt once, then 1 token per copy
    assert [len(samples) for samples in out] == [3, 3]
    assert len({s["generation"] for s in out[0]}) > 1  # different keys, different samples
    flat = g.text_completion([p for p in prompts for _ in range(3)], temperature=1.0, max_gen_len=6,
                             logprobs=True, seed=9)
    assert [s["tokens"] for samples in out for s in samples] == [s["tokens"] for s in flat]
    alone_generator = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=128, max_batch_size=1, device="cpu",
                                  dtype=None if dtype == "default" else dtype, prefix_cache=False)
    for i, prompt in enumerate(prompts):
        for j in range(3):
            request = Request(g.tokenizer.encode(prompt, bos=True, eos=False), 6, 1.0, 0.9,
                              request_key(9, i * 3 + j), tuple(g.tokenizer.stop_tokens), logprobs=True)
            alone = dict(alone_generator.complete([request]))[0]
            assert token_texts(g.tokenizer, alone.tokens) == out[i][j]["tokens"], (dtype, i, j)
            if dtype == "fp32":
                torch.testing.assert_close(alone.logprobs, out[i][j]["logprobs"], rtol=0, atol=LOGPROB_TOLERANCE)


def test_n_in_chat_completion_and_bad_values(generator):
    dialog = [{"role": "user", "content": "Say three different things, one per sample, please."}]
    out = generator.chat_completion([dialog], temperature=1.0, max_gen_len=4, seed=2, n=2)
    flat = generator.chat_completion([dialog, dialog], temperature=1.0, max_gen_len=4, seed=2)
    assert out == [flat]
    from llama import LlamaError

    for bad in (0, 129, True, 1.5):
        with pytest.raises(LlamaError, match=f"^n={bad!r}"):
            generator.text_completion(["x"], n=bad)
