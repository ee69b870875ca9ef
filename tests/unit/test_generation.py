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
    monkeypatch.setattr(generator.engine, "prefix_cache", False)  # the whole prompt is prefilled
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


# ---- sampling controls and stop strings in the library -----------------------------------------

@pytest.fixture(scope="module")
def generators(generator, tiny_ckpt, sp_tokenizer):
    """The suite's fp32 generator and one in the default dtype (bf16 on CPUs with native bf16)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLAMA_DTYPE")
        state = torch.get_rng_state()
        default = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu")
        torch.set_rng_state(state)
    return {"fp32": generator, "default": default}


@pytest.mark.parametrize("dtype", ["fp32", "default"])
def test_logit_bias_steers_greedy_text_and_logprobs_stay_the_models(generators, dtype):
    g = generators[dtype]
    paris, london = (g.tokenizer.encode(w, bos=False, eos=False)[0] for w in ("Paris", "London"))
    free = g.text_completion(PROMPTS[:2], temperature=0, max_gen_len=4, logprobs=True)
    to_paris = g.text_completion(PROMPTS[:2], temperature=0, max_gen_len=4, logprobs=True, logit_bias={paris: 100})
    to_london = g.text_completion(PROMPTS[:2], temperature=0, max_gen_len=4, logit_bias={str(london): 100})
    assert [r["generation"] for r in to_paris] == ["Paris Paris Paris Paris"] * 2
    assert [r["generation"] for r in to_london] == ["London London London London"] * 2
    # the reported logprob is the raw model's: "Paris" is no likely token of a random model
    prompt = _ids(g, PROMPTS[:1])[0]
    raw = torch.log_softmax(g.model(torch.tensor([prompt]), 0)[0, -1].float(), -1)[paris]
    assert to_paris[0]["logprobs"][0] == pytest.approx(float(raw), abs=1e-4 if dtype == "fp32" else 0.05)
    assert to_paris[0]["logprobs"][0] < -3
    first = g.generate([prompt], 1, temperature=0, stop_tokens=[])[0][0][0]
    assert g.generate([prompt], 1, temperature=0, stop_tokens=[], logit_bias={first: -100})[0][0][0] != first
    assert free != to_paris


@pytest.mark.parametrize("dtype", ["fp32", "default"])
def test_controls_sample_reproducibly_and_top_k_1_is_greedy(generators, dtype):
    g = generators[dtype]
    greedy = g.text_completion(PROMPTS, temperature=0, max_gen_len=8)
    assert g.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=8, top_k=1, seed=3) == greedy
    assert g.text_completion(PROMPTS, temperature=1.0, top_p=1.0, max_gen_len=8, min_p=1.0, seed=3) == greedy
    controls = dict(top_k=20, min_p=0.01, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3,
                    logit_bias={13: 3.0})
    sampled = g.text_completion(PROMPTS, temperature=1.0, max_gen_len=8, seed=3, **controls)
    assert g.text_completion(PROMPTS, temperature=1.0, max_gen_len=8, seed=3, **controls) == sampled
    assert sampled != g.text_completion(PROMPTS, temperature=1.0, max_gen_len=8, seed=3)
    torch.manual_seed(0)
    streamed = "".join(g.stream_completion(PROMPTS[1], temperature=1.0, max_gen_len=8, **controls))
    torch.manual_seed(0)
    assert streamed == g.text_completion(PROMPTS[1:2], temperature=1.0, max_gen_len=8, **controls)[0]["generation"]


def _stop_in(text: str) -> str:
    """A stop string from the middle of a generated text: its middle word's first 3 letters."""
    words = [w for w in text.split() if w.isascii() and w.isalpha() and len(w) >= 3]
    stop = words[len(words) // 2][:3]
    assert 0 < text.find(stop)
    return stop


def test_stop_strings_cut_the_text_and_free_the_row(generator):
    free = generator.text_completion(PROMPTS, temperature=0, max_gen_len=20, logprobs=True)
    assert [len(r["tokens"]) for r in free] == [20] * 4  # no stop token: the budget ends them
    stop = _stop_in(free[0]["generation"])
    other = _stop_in(free[1]["generation"])
    cut = generator.text_completion(PROMPTS, temperature=0, max_gen_len=20, logprobs=True, stop=["\x00", other, stop])
    for f, c in zip(free, cut):
        text = f["generation"]
        found = [i for i in (text.find(stop), text.find(other)) if i >= 0]
        if not found:
            assert c == f
            continue
        assert c["generation"] == text[: min(found)]  # before the first stop string, whichever it is
        n = len(c["tokens"])
        assert n < 20 and c["tokens"] == f["tokens"][:n] and c["logprobs"] == f["logprobs"][:n]
        # the last token is the one that completed a stop string
        assert any(s in "".join(c["tokens"]) for s in (stop, other))
        assert not any(s in "".join(c["tokens"][:-1]) for s in (stop, other))
    assert generator.last_stats.generated_tokens == sum(len(c["tokens"]) for c in cut) < 80  # rows freed early

    ids = _ids(generator, PROMPTS)
    tokens, lps = generator.generate(ids, 20, temperature=0, logprobs=True, stop=[stop, other])
    assert [len(t) for t in tokens] == [len(c["tokens"]) for c in cut] and lps[0] == cut[0]["logprobs"]
    steps = list(generator.stream_tokens(ids[:1], 20, temperature=0, stop=stop))  # one string works too
    assert [s[0][0] for s in steps] == tokens[0]
    assert "".join(generator.stream_completion(PROMPTS[0], temperature=0, max_gen_len=20, stop=[stop])) == \
        cut[0]["generation"]
    assert generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=20, stop=[]) == \
        generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=20)


def test_stop_strings_with_echo_look_at_the_generated_text_only(generator):
    prompt = PROMPTS[2]
    free = generator.text_completion([prompt], temperature=0, max_gen_len=20)[0]["generation"]
    echoed = generator.text_completion([prompt], temperature=0, max_gen_len=20, echo=True)[0]["generation"]
    stop = _stop_in(free)
    cut = generator.text_completion([prompt], temperature=0, max_gen_len=20, echo=True, stop=stop)[0]["generation"]
    assert cut.startswith(prompt) and cut == echoed[: len(echoed) - len(free) + free.find(stop)]
    in_prompt = "upon"  # in the prompt, not in what it generates
    assert in_prompt not in free
    assert generator.text_completion([prompt], temperature=0, max_gen_len=20, echo=True,
                                     stop=in_prompt)[0]["generation"] == echoed


def test_stop_strings_in_chat_completion_and_stream_chat(generator, monkeypatch):
    dialogs = [[{"role": "user", "content": "Hello!"}], [{"role": "user", "content": "Name a colour."}]]
    monkeypatch.setattr(generator.engine, "prefix_cache", False)  # equal calls, equal bits
    free = generator.chat_completion(dialogs, temperature=0, max_gen_len=20, logprobs=True)
    answer = free[0]["generation"]["content"]
    stop = _stop_in(answer)
    cut = generator.chat_completion(dialogs, temperature=0, max_gen_len=20, logprobs=True, stop=[stop])
    assert cut[0]["generation"] == {"role": "assistant", "content": answer[: answer.find(stop)]}
    n = len(cut[0]["tokens"])
    assert n < len(free[0]["tokens"]) and cut[0]["logprobs"] == free[0]["logprobs"][:n]
    assert stop in "".join(cut[0]["tokens"]) and stop not in "".join(cut[0]["tokens"][:-1])
    if stop not in free[1]["generation"]["content"]:
        assert cut[1] == free[1]
    assert "".join(generator.stream_chat(dialogs[0], temperature=0, max_gen_len=20, stop=[stop])) == \
        cut[0]["generation"]["content"]


BAD_CONTROLS = [
    (dict(top_k=-1), "^top_k=-1 must be an integer >= 0"),
    (dict(min_p=1.01), "^min_p=1.01 must be a finite number from 0 to 1"),
    (dict(presence_penalty=3), "^presence_penalty=3 must be a finite number from -2 to 2"),
    (dict(frequency_penalty=float("nan")), "^frequency_penalty=nan"),
    (dict(repetition_penalty=-1), "^repetition_penalty=-1 must be a finite number > 0"),
    (dict(logit_bias={32000: 1}), "^logit_bias key=32000 must be an integer from 0 to 31999"),
    (dict(logit_bias={1: -101}), "^logit_bias value=-101"),
    (dict(logit_bias="1:2"), "^logit_bias='1:2' must be a dict"),
    (dict(stop=5), "^stop=5 must be a string or a list of strings"),
    (dict(stop=["ok", 5]), r"^stop\[1\] must be text"),
    (dict(stop=["a\ud800"]), r"^stop\[0\] is not valid Unicode"),
]


@pytest.mark.parametrize("kwargs, match", BAD_CONTROLS)
def test_bad_controls_and_stops_are_named_by_every_call(generator, kwargs, match):
    dialog = [{"role": "user", "content": "hi"}]
    calls = [lambda: generator.text_completion(["hi"], max_gen_len=4, **kwargs),
             lambda: generator.chat_completion([dialog], max_gen_len=4, **kwargs),
             lambda: generator.generate([[1, 450]], 4, **kwargs),
             lambda: generator.stream_tokens([[1, 450]], 4, **kwargs),
             lambda: generator.stream_completion("hi", max_gen_len=4, **kwargs),
             lambda: generator.stream_chat(dialog, max_gen_len=4, **kwargs)]
    for call in calls:
        with pytest.raises(LlamaError, match=match):
            call()
    assert generator.engine.idle


def test_meta_positional_call_shapes_still_work_and_new_arguments_are_keywords(generator, monkeypatch):
    monkeypatch.setattr(generator.engine, "prefix_cache", False)  # equal calls, equal bits
    assert generator.text_completion(PROMPTS[:1], 0.0, 0.9, 4, False, False) == \
        generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=4)
    dialog = [{"role": "user", "content": "hi"}]
    assert generator.chat_completion([dialog], 0.0, 0.9, 4, True) == \
        generator.chat_completion([dialog], temperature=0, max_gen_len=4, logprobs=True)
    assert generator.generate([[1, 450]], 4, 0.0, 0.9, False, False, [], None)[0] == \
        generator.generate([[1, 450]], 4, temperature=0, stop_tokens=[])[0]
    with pytest.raises(TypeError):
        generator.text_completion(PROMPTS[:1], 0.0, 0.9, 4, False, False, None, ["x"])  # stop is keyword-only



def test_first_use_work_is_left_out_of_tokens_per_s(tiny_ckpt, sp_tokenizer, monkeypatch, tmp_path, capsys):
    """On a fresh machine the decode backend is timed at the first decode step, after the first
    token: the tokens/s the CLIs print leave that time out and say what it was."""
    import re
    import time

    from llama.runtime import backend

    monkeypatch.delenv("LLAMA_NATIVE", raising=False)

    def slow_measurement(model, steps, batch):
        time.sleep(0.6)
        return {"torch": 1.0, **{name: 2.0 for name in steps}}

    monkeypatch.setattr(backend, "_time_decode", slow_measurement)
    for run in ("generate", "stream", "generate again", "batch"):
        if run != "generate again":
            monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / run))  # nothing measured here yet
        g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=2)
        prompts = _ids(g, PROMPTS[:2])
        if run == "batch":  # the job's closing line too
            from llama.batch import run_batch

            lines = [f'{{"id": {i}, "prompt": "{p}"}}\n' for i, p in enumerate(PROMPTS)]
            (tmp_path / "in.jsonl").write_text("".join(lines))
            run_batch(g, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), defaults=(0.0, 0.9, 8))
            assert re.search(r"tokens/s, after [1-9]\d* s of first-use work on this machine", capsys.readouterr().err)
            continue
        if run == "stream":
            list(g.stream_tokens(prompts, max_gen_len=8, temperature=0))
        else:
            g.generate(prompts, max_gen_len=8, temperature=0)
        stats = g.last_stats
        if run == "generate again":  # kept: nothing measured the second time
            assert stats.first_use_s == 0 and "first-use" not in stats.summary()
            continue
        assert stats.first_use_s >= 1.2 and f"with {stats.first_use_s:.0f} s of first-use work" in stats.summary()
        decode_s = stats.total_s - stats.time_to_first_token_s - stats.first_use_after_first_token_s
        assert stats.tokens_per_s == pytest.approx((stats.generated_tokens - 1) / decode_s)
        if run == "generate":  # the engine's first token comes from the prefill, before the measurement
            assert stats.first_use_after_first_token_s >= 1.2 and stats.time_to_first_token_s < 1.0
        else:  # a stream yields after the step that measured: the wait is in the first token's time
            assert stats.time_to_first_token_s >= 1.2
