"""python -m llama.serve as users run it: a real server process on a free localhost port (the tiny
checkpoint, fp32), driven by the real `openai` client, its answers compared with Llama's own
chat_completion / text_completion on the same weights (greedy, and sampled with a seed)."""

import asyncio
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers.serving import KEY, MAX_SEQ_LEN, MODEL, auth, start_server, stop_server  # noqa: E402
from llama import Llama  # noqa: E402
from llama.errors import LlamaError  # noqa: E402
from llama.runtime.sampling import check_sampling  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_ckpt, sp_tokenizer):
    proc, url = start_server(tiny_ckpt, sp_tokenizer, "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "4",
                             "--max_queue", "12", "--max_request_bytes", "20000")
    yield url
    rc, stderr = stop_server(proc)
    assert rc == 0, stderr[-3000:]
    assert KEY not in stderr  # never logged


@pytest.fixture(scope="module")
def reference(tiny_ckpt, sp_tokenizer):
    """The same weights in this process. One thread, as the servers run: two threads of the tiny
    model beside a busy server on two cores spend their time waiting for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu",
                      dtype="fp32")
    torch.set_num_threads(threads)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def dialog(i: int) -> list:
    return [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 5)}]


def expected_chat(reference, d, max_tokens, **sampling):
    out = reference.chat_completion([d], max_gen_len=max_tokens, logprobs=True, **sampling)[0]
    return out["generation"]["content"], len(out["tokens"]), out["logprobs"]


def test_chat_equals_chat_completion_with_usage_and_logprobs(client, reference):
    d = dialog(3)
    answer = client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=3)
    text, n_tokens, logprobs = expected_chat(reference, d, 12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    prompt_tokens = len(reference.formatter.encode_dialog_prompt(d))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == \
        (prompt_tokens, n_tokens, prompt_tokens + n_tokens)
    got = [entry.logprob for entry in choice.logprobs.content]
    assert got == pytest.approx(logprobs, abs=1e-4)
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(entry.token for entry in choice.logprobs.content) == text
    # One detokenizer everywhere: each token has the text chat_completion(logprobs=True) gives it.
    same_call = reference.chat_completion([d], max_gen_len=12, temperature=0, logprobs=True)[0]["tokens"]
    assert [entry.token for entry in choice.logprobs.content] == same_call
    chunks = [c for c in client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=12,
                                                        logprobs=True, stream=True) if c.choices]
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx(logprobs, abs=1e-4)
    assert "".join(e.token for e in entries) == "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stop_string_cuts_the_text_as_openai_does(client, reference):
    d = dialog(1)
    full, _, _ = expected_chat(reference, d, 30, temperature=0)
    stop = full[10:13]
    answer = client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=30, stop=[stop, "\x00"])
    assert answer.choices[0].message.content == full[: full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=30, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.find(stop)]


def test_16_concurrent_streams_equal_chat_completion(server, reference):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    lengths = [4 + 3 * (i % 6) for i in range(16)]  # rows leave and are taken at different steps

    async def one(i):
        text, finish, usage = "", None, None
        stream = await client.chat.completions.create(
            model=MODEL, messages=dialog(i), temperature=0, max_tokens=lengths[i], stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, usage

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    expected = {}
    for length in set(lengths):  # one chat_completion call per answer length
        ids = [i for i in range(16) if lengths[i] == length]
        answers = reference.chat_completion([dialog(i) for i in ids], temperature=0, max_gen_len=length, logprobs=True)
        expected.update({i: (a["generation"]["content"], len(a["tokens"])) for i, a in zip(ids, answers)})
    for i, (text, finish, usage) in enumerate(results):
        expected_text, n_tokens = expected[i]
        assert text == expected_text, i
        assert finish == ("length" if n_tokens == lengths[i] else "stop")
        assert usage.completion_tokens == n_tokens


def test_seeded_sampling_is_reproducible_under_any_concurrency(server, client, reference):
    d, sampling = dialog(2), dict(temperature=0.9, top_p=0.95)
    alone = client.chat.completions.create(model=MODEL, messages=d, max_tokens=16, seed=1234, **sampling)
    text = alone.choices[0].message.content
    assert text == reference.chat_completion([d], max_gen_len=16, seed=1234, **sampling)[0]["generation"]["content"]

    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def crowd():
        try:
            calls = [aclient.chat.completions.create(model=MODEL, messages=dialog(i), max_tokens=10 + i, seed=i,
                                                     **sampling) for i in range(5)]
            calls.insert(3, aclient.chat.completions.create(model=MODEL, messages=d, max_tokens=16, seed=1234,
                                                            **sampling))
            return await asyncio.gather(*calls)
        finally:
            await aclient.close()

    assert asyncio.run(crowd())[3].choices[0].message.content == text
    other = client.chat.completions.create(model=MODEL, messages=d, max_tokens=16, seed=99, **sampling)
    assert other.choices[0].message.content != text


def test_completions_echo_logprobs_equal_text_completion(client, reference):
    prompt = "The quick brown fox"
    answer = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, logprobs=2)
    expected = reference.text_completion([prompt], temperature=0, max_gen_len=8, logprobs=True, echo=True)[0]
    choice = answer.choices[0]
    assert choice.text == expected["generation"]
    prompt_tokens = len(reference.tokenizer.encode(prompt, bos=True, eos=False))
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected["logprobs"][1:], abs=1e-4)
    # Prompt tokens have their alternatives too (lm-eval reads them), all but the first.
    tops = choice.logprobs.top_logprobs
    assert tops[0] is None and all(len(t) == 2 for t in tops[1:]) and len(tops) == prompt_tokens + 8
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens == 8
    # Without echo the text continues the prompt: prompt + text is what text_completion decodes.
    plain = client.completions.create(model=MODEL, prompt=[prompt], temperature=0, max_tokens=8)
    assert prompt + plain.choices[0].text == expected["generation"]
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health", headers=auth()).json()
    assert health["status"] == "ok" and {"running", "waiting", "decode_steps"} <= set(health)


def test_errors_in_openai_shape_with_status_codes(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/v1/models").status_code == 401  # every /v1 route
    assert httpx.get(f"{server}/health").status_code == 200  # liveness probes send no key
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=dialog(0), n=17)
    assert exc.value.body["param"] == "n"
    with pytest.raises(LlamaError) as llama_error:
        check_sampling(-1, 0.9, None)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=dialog(0), temperature=-1)
    assert exc.value.body["message"] == str(llama_error.value) and exc.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    assert "message 0 has role 'assistant' where 'user' was expected" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # 2049 tokens of ids: over the context
        client.completions.create(model=MODEL, prompt=[5] * (MAX_SEQ_LEN + 1), max_tokens=1)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=MAX_SEQ_LEN)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=dialog(0))
    big = httpx.post(f"{server}/v1/completions", headers=auth(), json={"model": MODEL, "prompt": "x" * 30000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{server}/v1/completions", headers=auth(), content=iter([b"{" + b" " * 15000] * 2))
    assert chunked.status_code == 413  # no Content-Length: counted while read
    bad = httpx.post(f"{server}/v1/completions", headers={**auth(), "Content-Type": "application/json"}, content=b"{")
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_client_disconnect_mid_stream_frees_the_row(server):
    body = {"model": MODEL, "messages": dialog(4), "temperature": 0, "max_tokens": MAX_SEQ_LEN - 64, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/chat/completions", headers=auth(), json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            before = http.get(f"{server}/health", headers=auth()).json()
            assert before["running"] == 1
        # The connection is closed: the server must cancel the request and free its row.
        deadline = time.monotonic() + 10
        while (health := http.get(f"{server}/health", headers=auth()).json())["running"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
    steps_after = health["decode_steps"] - before["decode_steps"]
    assert health["outstanding"] == 0
    # Measured 1 to 5 here under heavy load (steps since the last snapshot, the client still reading
    # then); the answer would have taken ~1980.
    assert steps_after < 25, steps_after


@pytest.mark.torchrun
def test_two_rank_torchrun_server_and_queue_full(tiny_ckpt_mp2, sp_tokenizer, reference):
    proc, url = start_server(tiny_ckpt_mp2, sp_tokenizer, "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "1",
                             "--max_queue", "0", nproc=2)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        d = dialog(2)
        answer = client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=10)
        assert answer.choices[0].message.content == expected_chat(reference, d, 10, temperature=0)[0]
        # One row, no queue: a second request while one runs is refused with 503.
        long = client.chat.completions.create(model=MODEL, messages=d, temperature=0,
                                              max_tokens=MAX_SEQ_LEN - 64, stream=True)
        next(iter(long))
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model=MODEL, messages=d, max_tokens=2)
        assert exc.value.status_code == 503 and exc.value.code == "queue_full"
        long.close()
    finally:
        rc, stderr = stop_server(proc)
    # torchrun itself exits 1 with its own traceback when signalled; the servers end cleanly.
    assert "SignalException" in stderr and "/llama/" not in stderr and "error:" not in stderr, stderr[-3000:]


# ---- llama.detokenize: tokens -> final text pieces, without a server -------------------------

@pytest.fixture(scope="module")
def sp(sp_tokenizer):
    from llama.tokenizer import Tokenizer

    return Tokenizer(sp_tokenizer)


def released(stream, tokens):
    pieces = []
    for token in tokens:
        stream.add(token)
        pieces.append(stream.take())
    return pieces + [stream.finish()]


def test_text_stream_never_releases_half_characters_and_joins_to_the_decoded_text(sp):
    from llama.detokenize import Detokenizer

    text = "Hello 🦙 world, naïve 日本語"
    tokens = sp.encode(text, bos=False, eos=False)
    assert any("\ufffd" in sp.decode(tokens[:i]) for i in range(len(tokens)))  # the llama is split in bytes
    pieces = released(Detokenizer(sp), tokens)
    assert "".join(pieces) == sp.decode(tokens) and not any("\ufffd" in p for p in pieces)


def test_text_stream_cuts_at_the_first_stop_string_and_holds_back_its_beginnings(sp):
    from llama.detokenize import Detokenizer

    tokens = sp.encode("Hello world, this is it", bos=False, eos=False)
    stream = Detokenizer(sp, stops=["world!", "d, th"])
    stream.add(tokens[0])
    stream.add(tokens[1])
    assert stream.take() == "Hello "  # "world" may begin "world!": held back
    stream.add(tokens[2])
    assert stream.take() == "worl" and not stream.stopped  # "d," may begin "d, th"
    stream.add(tokens[3])
    assert stream.take() == "" and stream.stopped  # "d, th" spans three tokens
    assert stream.finish() == "" and stream.sent == "Hello worl"


def test_text_stream_keeps_the_space_before_a_continuation(sp):
    from llama.detokenize import Detokenizer

    prompt = sp.encode("Hello", bos=True, eos=False)
    answer = sp.encode("Hello world again", bos=True, eos=False)[len(prompt):]
    assert "".join(released(Detokenizer(sp, context=prompt), answer)) == " world again"
    assert "".join(released(Detokenizer(sp), answer)) == "world again"  # a chat answer: as chat_completion


def test_bf16_server_answers_as_chat_completion_in_bf16(tiny_ckpt, sp_tokenizer, reference):
    """The default dtype on this CPU: one request alone decodes the same rows as chat_completion
    alone, so the greedy answers and logprobs agree in bf16 too."""
    proc, url = start_server(tiny_ckpt, sp_tokenizer, "--max_seq_len", "256", "--max_batch_size", "4", dtype="bf16")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        d = dialog(3)
        answer = client.chat.completions.create(model=MODEL, messages=d, temperature=0, max_tokens=16, logprobs=True)
    finally:
        rc, stderr = stop_server(proc)
    assert rc == 0, stderr[-3000:]
    bf16 = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=256, max_batch_size=4, device="cpu", dtype="bf16")
    expected = bf16.chat_completion([d], temperature=0, max_gen_len=16, logprobs=True)[0]
    assert answer.choices[0].message.content == expected["generation"]["content"]
    assert [e.logprob for e in answer.choices[0].logprobs.content] == pytest.approx(expected["logprobs"], abs=1e-3)


def test_the_documented_curl_request_answers_as_chat_completion(server, reference):
    """docs/serving.md's curl command, as written (the served model's name for the demo's), gets
    chat_completion's greedy answer."""
    import json
    import re
    import shlex

    from helpers import REPO

    block = re.search(r"```bash\n(curl .*?)```", (REPO / "docs" / "serving.md").read_text(), re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    url = words[1]
    headers = dict(h.split(": ", 1) for flag, h in zip(words, words[1:]) if flag == "-H")
    body = json.loads(words[words.index("-d") + 1])
    assert url.startswith("http://127.0.0.1:8000/v1/") and body["model"] == "SmolLM2-135M-Instruct"
    body["model"] = MODEL
    answer = httpx.post(server + url.removeprefix("http://127.0.0.1:8000"), json=body,
                        headers={**headers, **auth()}, timeout=60).json()
    expected = reference.chat_completion([body["messages"]], max_gen_len=body["max_tokens"], temperature=0)[0]
    assert answer["choices"][0]["message"]["content"] == expected["generation"]["content"]


def test_a_chat_turn_and_n_choices_reuse_cached_prefixes(client, server, reference):
    """The second turn of a chat prefills only what the first did not hold (prefix caching), and
    n=4 choices of one prompt prefill it once; the answers are chat_completion's."""
    def health():
        return httpx.get(f"{server}/health", headers=auth()).json()

    d = [{"role": "system", "content": "You answer every question about the weather in Paris. " * 3},
         {"role": "user", "content": "Will it rain tomorrow?"}]
    first = client.chat.completions.create(model=MODEL, messages=d, max_tokens=8, temperature=0)
    d = d + [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the day after?"}]
    before = health()
    second = client.chat.completions.create(model=MODEL, messages=d, max_tokens=8, temperature=0)
    after = health()
    prompt = len(reference.formatter.encode_dialog_prompt(d))
    reused = after["prefix_reused_tokens"] - before["prefix_reused_tokens"]
    assert reused >= first.usage.prompt_tokens - 1 and after["prefill_tokens"] - before["prefill_tokens"] == \
        prompt - reused
    assert second.choices[0].message.content == expected_chat(reference, d, 8, temperature=0)[0]

    before = health()
    snow = d[:1] + [{"role": "user", "content": "Snow?"}]
    # top_k 5: no near-ties among the candidates, whose order a 1e-6 rounding difference could swap
    four = client.chat.completions.create(model=MODEL, messages=snow, max_tokens=4, temperature=1.0, top_p=0.9, n=4,
                                          seed=3, extra_body={"top_k": 5})
    library = reference.chat_completion([snow], temperature=1.0, top_p=0.9, max_gen_len=4, seed=3, n=4, top_k=5)[0]
    assert len({c.message.content for c in four.choices}) > 1
    assert [c.message.content for c in four.choices] == [s["generation"]["content"] for s in library]
    after, prompt = health(), four.usage.prompt_tokens
    prefilled = after["prefill_tokens"] - before["prefill_tokens"]
    assert prefilled <= prompt + 3  # once, then each other choice its last token (4 * prompt without reuse)
    assert prefilled + after["prefix_reused_tokens"] - before["prefix_reused_tokens"] == 4 * prompt
    assert b"llama_prefix_reused_tokens" in httpx.get(f"{server}/metrics", headers=auth()).content


def test_best_of_answers_the_n_samples_with_the_highest_mean_logprob(client, reference):
    """best_of=5, n=2: five samples of the prompt (choice i sampled as the library's sample i
    with the same seed), the two with the highest mean token logprob returned, best first;
    usage counts all five. Streamed, or below n, it is refused by name."""
    prompt = "Once upon a time"
    answer = client.completions.create(model=MODEL, prompt=prompt, n=2, best_of=5, max_tokens=6, temperature=1.0,
                                       top_p=0.9, seed=7, extra_body={"top_k": 5})
    samples = reference.text_completion([prompt], temperature=1.0, top_p=0.9, max_gen_len=6, seed=7, top_k=5,
                                        logprobs=True, n=5)[0]
    ranked = sorted(samples, key=lambda s: -sum(s["logprobs"]) / len(s["logprobs"]))
    # (the server's text continues the prompt's: its leading space is kept, the library's is not)
    assert [c.text.lstrip() for c in answer.choices] == [s["generation"].lstrip() for s in ranked[:2]]
    assert [c.index for c in answer.choices] == [0, 1] and answer.choices[0].logprobs is None
    assert answer.usage.completion_tokens == sum(len(s["tokens"]) for s in samples)
    for kwargs, match in ((dict(n=3, best_of=2), "best_of=2 must be at least n=3"),
                          (dict(n=1, best_of=2, stream=True), "best_of=2 above n=1 cannot be streamed")):
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **kwargs)
