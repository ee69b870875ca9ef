"""The scheduler (llama.runtime.engine): continuous batching over the KV cache's rows.

The reference for every batched result is the same request run alone (max_batch_size 1, one
request in the engine), through the model's plain path: rows joining and leaving mid-flight,
chunked prefill, any max_batch_size, input order or batch mates must give exactly that in fp32,
greedy and sampled. Also: the max_seq_len boundary (issue 9 item 4), cancel, events, threads,
and what holds in bf16."""

import dataclasses
import threading

import pytest
import torch

from llama import Llama, LlamaError
from llama.runtime.engine import Engine, Request
from llama.runtime.sampling import SamplingControls, request_key

SEQ = 64
TEXTS = ["Once upon a time", "The capital of France is", "A long time ago in a galaxy far, far away", "Hello",
         "def fibonacci(n):", "The quick brown fox jumps over the lazy dog because", "x"]
GEN_LENS = [6, 3, 9, 11, 1, 7, 4]  # rows leave at different steps


@pytest.fixture(autouse=True, params=["0", "1"], ids=["torch-decode", "native-decode"])
def decode_backend(request, monkeypatch):
    """Every test on each decode backend, forced (LLAMA_NATIVE=0 / 1): results equal across
    batch sizes only on one backend (the native step agrees with PyTorch's within 1e-4 in
    fp32, tests/test_native_engine.py), while the measured default may pick one backend for
    one batch size and the other for another."""
    from llama import native

    if request.param == "1" and not native.available():
        pytest.skip("no native kernels here (no compiler)")
    monkeypatch.setenv("LLAMA_NATIVE", request.param)
    return request.param


@pytest.fixture(scope="module")
def builds(tiny_ckpt, sp_tokenizer):
    """fp32 Llamas over the same weights with max_batch_size 1, 3 and 8."""
    return {b: Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=SEQ, max_batch_size=b, device="cpu",
                           dtype="fp32") for b in (1, 3, 8)}


def _requests(tok, temperature, stops=()):
    return [Request(tok.encode(t, bos=True, eos=False), n, temperature, 0.9, request_key("engine", i), stops)
            for i, (t, n) in enumerate(zip(TEXTS, GEN_LENS))]


def _run(llama, requests, **engine_options):
    """The requests' tokens through a fresh engine with these options (results in request order)."""
    llama.engine = Engine(llama.model, **engine_options)
    return [h.tokens for h in llama._run(requests)]


def _alone(llama1, requests):
    return [_run(llama1, [r])[0] for r in requests]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_joining_and_leaving_give_each_request_its_result_alone(builds, temperature):
    tok = builds[1].tokenizer
    requests = _requests(tok, temperature)
    alone = _alone(builds[1], requests)
    assert [len(t) for t in alone] == GEN_LENS  # no stop tokens in this model's output: budgets end them
    assert len({tuple(t) for t in alone}) == len(alone)
    assert _run(builds[8], requests) == alone
    for options in ({"prefill_chunk": 4}, {"decode_rows": "active"}, {"decode_rows": "all"}, {"policy": "static"}):
        assert _run(builds[3], requests, **options) == alone, options
    # another input order, other batch mates: each request keeps its result
    order = [5, 2, 0, 6, 3, 1, 4]
    got = _run(builds[3], [requests[i] for i in order], prefill_chunk=5)
    assert got == [alone[i] for i in order]
    assert _run(builds[8], requests[3:6]) == alone[3:6]


def test_a_stop_token_frees_its_row_mid_flight(builds):
    tok = builds[1].tokenizer
    plain = _requests(tok, 1.0)
    alone = _alone(builds[1], plain)
    stop = alone[0][4]  # request 0 stops before its 5th token (at its first occurrence)
    first = alone[0].index(stop)
    requests = [Request(r.prompt_tokens, r.max_gen_len, r.temperature, r.top_p, r.key, (stop,)) for r in plain]
    expected = [t[: t.index(stop)] if stop in t else t for t in alone]
    assert expected[0] == alone[0][:first]
    builds[3].engine = Engine(builds[3].model)
    handles = builds[3]._run(requests)
    assert [h.tokens for h in handles] == expected
    assert handles[0].finish_reason == "stop"
    assert [h.finish_reason for h in handles] == ["stop" if stop in t else "length" for t in alone]


def test_generate_matches_one_by_one_for_any_batch_size_and_order(builds):
    tok = builds[1].tokenizer
    prompts = [tok.encode(t, bos=True, eos=False) for t in TEXTS]
    # max_batch_size 1 runs the prompts one by one
    runs = {b: builds[b].generate(prompts, 8, 0.8, 0.9, logprobs=True, seed=11, stop_tokens=[]) for b in (1, 3, 8)}
    assert runs[1][0] == runs[3][0] == runs[8][0]  # tokens: exactly
    assert len({tuple(t) for t in runs[1][0]}) == len(prompts)
    for b in (3, 8):  # logprobs: the batch shape may change a matmul's fp32 rounding
        for mine, ref in zip(runs[b][1], runs[1][1]):
            assert torch.allclose(torch.tensor(mine), torch.tensor(ref), atol=1e-4)
    # prompt i keys on (seed, i), whatever else is in the call
    assert builds[3].generate(prompts[2:4], 8, 0.8, 0.9, seed=11, stop_tokens=[])[0] != runs[1][0][2:4]
    swapped = builds[3].generate([prompts[1], prompts[0]], 8, 0.8, 0.9, seed=11, stop_tokens=[])[0]
    assert swapped != runs[1][0][:2][::-1] and builds[3].generate(prompts[:2], 8, 0.8, 0.9, seed=11,
                                                                  stop_tokens=[])[0] == runs[1][0][:2]


def test_engine_events_cancel_and_refill(builds):
    llama = builds[3]
    engine = llama.engine = Engine(llama.model)
    reqs = _requests(llama.tokenizer, 0.0)
    handles = [engine.submit(r) for r in reqs[:5]]
    events = engine.step()  # 3 admitted and prefilled (sampling a first token), then one decode
    assert [e.handle.id for e in events] == [0, 1, 2, 0, 1, 2] and all(e.token is not None for e in events)
    assert [h.row for h in handles] == [0, 1, 2, None, None]
    engine.cancel(handles[1])
    assert engine.rows[1] is None and handles[1].finish_reason == "cancelled"
    events = engine.step()  # the cancellation is reported; request 3 takes row 1 at once
    assert (events[0].handle, events[0].finish_reason) == (handles[1], "cancelled")
    assert handles[3].row == 1 and len(handles[3].tokens) == 2
    engine.cancel(handles[4])  # still waiting: leaves the queue
    while not engine.idle:
        engine.step()
    assert [h.finish_reason for h in handles] == ["length", "cancelled", "length", "length", "cancelled"]
    assert handles[4].tokens == [] and len(handles[3].tokens) == reqs[3].max_gen_len
    assert handles[3].tokens == _alone(builds[1], [reqs[3]])[0]
    engine.cancel(handles[0])  # finished: a no-op
    assert handles[0].finish_reason == "length"


def test_engine_refuses_bad_requests_naming_them(builds):
    engine = Engine(builds[3].model)
    with pytest.raises(LlamaError, match="request 0 has 65 tokens, 1 too many for max_seq_len=64"):
        engine.submit(Request([1] * 65, 4))
    with pytest.raises(LlamaError, match="job x: key=-1 must be an integer"):
        engine.submit(Request([1], 4, key=-1), where="job x")
    with pytest.raises(LlamaError, match="policy='fifo' must be one of continuous, static"):
        Engine(builds[3].model, policy="fifo")


@pytest.mark.parametrize("k", [0, 1, 2, 7])
def test_budget_at_the_max_seq_len_boundary(builds, k):
    """A prompt of max_seq_len - k tokens gets exactly min(k, max_gen_len) tokens when no stop
    token occurs; a prompt that fills the context generates nothing, as Meta's code."""
    llama = builds[3]
    prompt = [1] + [450 + i for i in range(SEQ - k - 1)]
    for max_gen_len in (3, 40):
        tokens, lps = llama.generate([prompt, [1, 450]], max_gen_len, 0.0, logprobs=True, stop_tokens=[])
        assert len(tokens[0]) == min(k, max_gen_len) and len(lps[0]) == len(tokens[0])
        assert len(tokens[1]) == max_gen_len  # its batch mate is not cut
    if k == 0:  # text_completion too: a text of exactly max_seq_len tokens (with BOS) gets ""
        text = " ".join(["the"] * (SEQ - 1))
        assert len(llama.tokenizer.encode(text, bos=True, eos=False)) == SEQ
        pred = llama.text_completion([text] * 2 + ["hi"], max_gen_len=5, temperature=0)
        assert pred[0]["generation"] == pred[1]["generation"] == "" and pred[2]["generation"] != ""


def test_threads_sharing_one_llama_get_their_own_results(builds):
    """Calls from several threads share the engine's batch (the lock serialises its steps);
    each gets what it would get alone."""
    llama = builds[3]
    llama.engine = Engine(llama.model)
    tok = llama.tokenizer
    prompts = [[tok.encode(t, bos=True, eos=False)] for t in TEXTS[:6]]
    expected = [llama.generate(p, 10, 1.0, 0.9, seed=i, stop_tokens=[])[0] for i, p in enumerate(prompts)]
    got, errors = [None] * 6, []
    barrier = threading.Barrier(6)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                got[i] = llama.generate(prompts[i], 10, 1.0, 0.9, seed=i, stop_tokens=[])[0]
                assert got[i] == expected[i]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected
    assert llama.engine.idle


def test_bf16_results_agree_across_batch_sizes(tiny_ckpt, sp_tokenizer):
    """In the default dtype (bf16) rows are still independent: each request gets valid tokens,
    and what it gets in a batch of 8 equals what it gets alone where bf16 kernels are
    row-independent (all 7 on this AVX512-BF16 CPU); the bound allows two rows whose matmul
    blocking differs elsewhere (a changed token changes the rest of its row). Rows that saw
    each other's cache would differ everywhere."""
    llamas = {b: Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=SEQ, max_batch_size=b, device="cpu",
                             dtype="bf16") for b in (1, 8)}
    assert llamas[8].model.norm.weight.dtype == torch.bfloat16
    tok = llamas[1].tokenizer
    requests = _requests(tok, 1.0)
    alone = _alone(llamas[1], requests)
    batched = _run(llamas[8], requests)
    assert [len(t) for t in batched] == GEN_LENS
    assert all(0 <= t < 32000 for row in batched for t in row)
    same = sum(a == b for a, b in zip(alone, batched))
    assert same >= len(requests) - 2, (same, alone, batched)


# ---- sampling controls and stop checks ---------------------------------------------------------

CONTROLS = [SamplingControls(), SamplingControls(top_k=5), SamplingControls(min_p=0.2, presence_penalty=1.5),
            SamplingControls(repetition_penalty=1.4, frequency_penalty=0.7, logit_bias=((450, 15.0), (1000, -50.0))),
            SamplingControls(), SamplingControls(top_k=40, min_p=0.05, repetition_penalty=0.8),
            SamplingControls(logit_bias=((13, 16.0),))]


def _controlled(tok, temperature):
    return [dataclasses.replace(r, controls=c) for r, c in zip(_requests(tok, temperature), CONTROLS)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_with_controls_get_their_result_alone_whatever_their_batch_mates(builds, temperature):
    """Each request's controls and token counts are its own (fp32): alone, in batches of 3 and 8,
    in another order, and a request without controls as it is beside none."""
    tok = builds[1].tokenizer
    requests = _controlled(tok, temperature)
    alone = _alone(builds[1], requests)
    assert _run(builds[8], requests) == alone
    assert _run(builds[3], requests, prefill_chunk=4) == alone
    order = [6, 3, 0, 5, 1, 4, 2]
    assert _run(builds[3], [requests[i] for i in order]) == [alone[i] for i in order]
    plain = _requests(tok, temperature)
    assert [alone[0], alone[4]] == _alone(builds[1], [plain[0], plain[4]])  # no controls: as before
    assert _run(builds[8], plain)[4] == alone[4]
    changed = [a != b for a, b in zip(alone, _alone(builds[1], plain))]
    assert changed[3] and changed[6]  # the controls did something: the biases greedily too,
    assert not temperature or sum(changed) >= 4  # and cuts and penalties when sampling


def test_a_stop_check_frees_the_row_with_the_token_it_saw(builds):
    llama = builds[3]
    engine = llama.engine = Engine(llama.model)
    reqs = _requests(llama.tokenizer, 0.0)
    full = _alone(builds[1], reqs[:2])
    seen = []

    def check(token):
        seen.append(token)
        return len(seen) == 3

    stopped, other = engine.submit(reqs[0], stop_check=check), engine.submit(reqs[1])
    events = []
    while not engine.idle:
        events += engine.step()
    assert stopped.tokens == full[0][:3] == seen and stopped.finish_reason == "stop"
    last = [e for e in events if e.handle is stopped][-1]
    assert (last.token, last.finish_reason) == (full[0][2], "stop")
    assert other.tokens == full[1] and other.finish_reason == "length"
    assert engine.stats.generated == 3 + len(full[1])  # the stopped row sampled nothing more
    # a stop string completed by the budget's last token is a stop, as the server reports it
    last_one = engine.submit(dataclasses.replace(reqs[0], max_gen_len=3), stop_check=lambda t: t == full[0][2])
    while not engine.idle:
        engine.step()
    assert last_one.tokens == full[0][:3] and last_one.finish_reason == "stop"


def test_engine_refuses_bad_controls_naming_them(builds):
    engine = Engine(builds[3].model)
    with pytest.raises(LlamaError, match="request 0: controls={'top_k': 3} must be a SamplingControls"):
        engine.submit(Request([1], 4, controls={"top_k": 3}))
    with pytest.raises(LlamaError, match="job 7: logit_bias key=32000 must be an integer from 0 to 31999"):
        engine.submit(Request([1], 4, controls=SamplingControls(logit_bias=((32000, 1.0),))), where="job 7")
    with pytest.raises(LlamaError, match="request 0: top_k=-2 must be an integer >= 0"):
        engine.submit(Request([1], 4, controls=SamplingControls(top_k=-2)))
    assert engine.idle
