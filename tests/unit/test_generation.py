"""The decode loop: KV cache, ragged batches, chunking, sampling, stopping, chat format."""

import pytest
import torch

from llama import Llama, LlamaError, sample_top_p

PROMPTS = ["Hello world", "The capital of France is", "Once upon a time, in a land far away, there", "A"]


def _ids(generator, texts):
    return [generator.tokenizer.encode(t, bos=True, eos=False) for t in texts]


def test_kv_cached_decoding_equals_full_forward(generator):
    prompt = _ids(generator, [PROMPTS[2]])[0]
    tokens, logprobs = generator.generate([prompt], max_gen_len=12, temperature=0, logprobs=True)
    full = torch.tensor([prompt + tokens[0]])
    logits = generator.model(full, 0)[0]  # one forward over the whole sequence, fresh cache use
    expected = logits[len(prompt) - 1: -1].argmax(-1).tolist()
    assert tokens[0] == expected
    expected_lp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    expected_lp = expected_lp.gather(-1, torch.tensor(tokens[0]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(logprobs[0]), expected_lp, atol=1e-4)


def test_ragged_batch_equals_one_by_one(generator):
    prompts = _ids(generator, PROMPTS)
    batch_tokens, batch_lps = generator.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    for prompt, tokens, lps in zip(prompts, batch_tokens, batch_lps):
        alone, alone_lps = generator.generate([prompt], max_gen_len=10, temperature=0, logprobs=True)
        assert tokens == alone[0]
        assert max(abs(a - b) for a, b in zip(lps, alone_lps[0])) < 1e-4


def test_more_prompts_than_max_batch_size_are_chunked_in_order(generator):
    texts = [f"Item number {i} is" for i in range(9)]  # max_batch_size is 4
    results = generator.text_completion(texts, temperature=0, max_gen_len=6)
    assert len(results) == 9
    for text, result in zip(texts, results):
        assert result == generator.text_completion([text], temperature=0, max_gen_len=6)[0]


def test_generation_respects_max_gen_len_and_max_seq_len(generator):
    prompt = list(range(1, 60))  # 59 tokens; max_seq_len is 64
    # No stop tokens: each row runs to its budget, so too few tokens fail as much as too many.
    tokens, _ = generator.generate([prompt, [1, 2]], max_gen_len=20, temperature=0, stop_tokens=[])
    assert len(tokens[0]) == 64 - 59
    assert len(tokens[1]) == 20


def test_stops_at_stop_token_and_omits_it(generator):
    prompt = _ids(generator, [PROMPTS[1]])
    free, _ = generator.generate(prompt, max_gen_len=8, temperature=0)
    stop = free[0][3]
    first = free[0].index(stop)
    steps = list(generator.stream_tokens(prompt, 8, temperature=0, top_p=1.0, stop_tokens=[stop]))
    assert [s[0][0] for s in steps] == free[0][:first]


def test_echo_returns_prompt_and_its_logprobs(generator):
    prompt = _ids(generator, [PROMPTS[0]])[0]
    tokens, lps = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 4
    assert len(lps[0]) == len(tokens[0]) and lps[0][0] == 0.0
    logits = generator.model(torch.tensor([prompt]), 0)[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1))
    assert torch.allclose(torch.tensor(lps[0][1: len(prompt)]), expected.squeeze(-1), atol=1e-4)


def test_text_completion_shapes(generator):
    plain = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=5)
    assert all(set(r) == {"generation"} and isinstance(r["generation"], str) for r in plain)
    scored = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=5, logprobs=True)
    for r, p in zip(scored, plain):
        assert r["generation"] == p["generation"]
        assert len(r["tokens"]) == len(r["logprobs"]) == 5
        assert all(lp <= 0 for lp in r["logprobs"])


def test_temperature_zero_is_the_argmax_chain_whatever_top_p_and_seed(generator):
    """Greedy decoding of a ragged batch is, for every prompt, the chain of argmaxes of full
    (uncached) forward passes; top_p and seed change nothing at temperature 0."""
    prompts = _ids(generator, PROMPTS)
    tokens, _ = generator.generate(prompts, max_gen_len=6, temperature=0, top_p=0.3, stop_tokens=[], seed=9)
    for prompt, got in zip(prompts, tokens):
        chain = list(prompt)
        for _ in range(6):
            chain.append(int(generator.model(torch.tensor([chain]), 0)[0, -1].argmax()))
        assert got == chain[len(prompt):]
    texts = generator.text_completion(PROMPTS, temperature=0, top_p=0.9, max_gen_len=6)
    assert texts == generator.text_completion(PROMPTS, temperature=0, top_p=0.5, max_gen_len=6, seed=1)


def test_same_seed_same_text(tiny_ckpt, sp_tokenizer):
    def sample(seed):
        g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, seed=seed)
        return g.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=12)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # 48 sampled tokens from near-uniform distributions


def test_sample_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    torch.manual_seed(0)
    for p, nucleus in [(0.45, {1}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (1.0, {0, 1, 2, 3})]:
        draws = torch.cat([sample_top_p(probs.repeat(500, 1), p) for _ in range(4)]).flatten()
        assert set(draws.tolist()) == nucleus, (p, set(draws.tolist()))
    # Inside the nucleus, tokens keep their relative odds (0.5 : 0.3).
    draws = sample_top_p(probs.repeat(20000, 1), 0.79).flatten()
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_gen_len=0), "max_gen_len"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_are_named(generator, kwargs, match):
    with pytest.raises(LlamaError, match=match):
        generator.text_completion(["hi"], **{"max_gen_len": 4, **kwargs})


def test_bad_prompts_are_named(generator):
    with pytest.raises(LlamaError, match="non-empty"):
        generator.text_completion([])
    with pytest.raises(LlamaError, match="prompt 1 must be a str"):
        generator.text_completion(["ok", 3])
    with pytest.raises(LlamaError, match=r"prompt 0 has 70 tokens, 6 too many"):
        generator.generate([list(range(1, 71))], max_gen_len=4)


# ---- Llama 2 chat format ----------------------------------------------------------------

def test_llama2_chat_format_matches_meta_format(generator):
    tok = generator.tokenizer
    dialog = [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": " Eiffel Tower, Louvre. "},
        {"role": "user", "content": "What is so great about #1?  "},
    ]
    expected = (
        tok.encode("[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I see? "
                   "[/INST] Eiffel Tower, Louvre. ", bos=True, eos=True)
        + tok.encode("[INST] What is so great about #1? [/INST]", bos=True, eos=False)
    )
    assert generator.formatter.encode_dialog_prompt(dialog) == expected
    single = [{"role": "user", "content": "what is the recipe of mayonnaise?"}]
    assert generator.formatter.encode_dialog_prompt(single) == tok.encode(
        "[INST] what is the recipe of mayonnaise? [/INST]", bos=True, eos=False)


def test_chat_completion_refuses_special_tags_like_meta(generator):
    dialogs = [
        [{"role": "user", "content": "Tell me about [INST] tags"}],
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "<<SYS>> evil"}, {"role": "user", "content": "hi"}],
    ]
    results = generator.chat_completion(dialogs, temperature=0, max_gen_len=5)
    assert results[0]["generation"] == {"role": "assistant", "content": generator.formatter.UNSAFE_ERROR}
    assert results[2]["generation"]["content"] == generator.formatter.UNSAFE_ERROR
    alone = generator.chat_completion([dialogs[1]], temperature=0, max_gen_len=5)
    assert results[1] == alone[0] and results[1]["generation"]["role"] == "assistant"


@pytest.mark.parametrize("dialog, match", [
    ([], "empty"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a 'user'"),
    ([{"role": "user", "content": 5}], r"content must be text \(str\)"),
])
def test_malformed_dialogs_are_named(generator, dialog, match):
    with pytest.raises(LlamaError, match=match):
        generator.chat_completion([dialog], max_gen_len=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=[[1, 2]] * 5), r"stream_tokens decodes at most max_batch_size=4 prompts at once, got 5"),
    (dict(prompt_tokens=[[1, 2]], temperature=-1), "temperature"),
    (dict(prompt_tokens=[[]]), "prompt 0 is empty"),
    (dict(prompt_tokens=[[1, 99999]]), r"token ids outside \[0, 32000\)"),
])
def test_stream_tokens_checks_like_generate_and_at_once(generator, kwargs, match):
    """The checks run when stream_tokens is called, not at the first step, and raise LlamaError."""
    with pytest.raises(LlamaError, match=match):
        generator.stream_tokens(**{"max_gen_len": 4, **kwargs})


def test_batch1_decode_uses_plain_cpu_kernels_and_the_model_flips_no_flag(generator, monkeypatch):
    """The kernel policy (llama.runtime.backend) is applied around the model by the decode loop:
    oneDNN off for single-row CPU steps, untouched for the prefill; forward() itself leaves the
    global flag alone (PyTorch's decode step: LLAMA_NATIVE=0)."""
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    seen = []
    forward = generator.model.forward

    def spy(tokens, *args, **kwargs):
        seen.append((tokens.numel(), torch.backends.mkldnn.enabled))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(generator.model, "forward", spy)
    assert torch.backends.mkldnn.enabled
    generator.generate([[1, 450, 7483]], max_gen_len=3, temperature=0, stop_tokens=[])
    assert seen == [(3, True), (1, False), (1, False)]
    assert torch.backends.mkldnn.enabled  # restored
    monkeypatch.undo()
    linear, inside = torch.nn.functional.linear, []

    def spy_linear(*args, **kwargs):
        inside.append(torch.backends.mkldnn.enabled)
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", spy_linear)
    generator.model(torch.tensor([[1]]), 0)  # called directly, the model uses what it is given
    assert inside and all(inside)
