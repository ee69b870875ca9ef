"""python -m llama.batch: restartable JSONL jobs. Killed midway and restarted, every id is
written exactly once with the results of an uninterrupted run; per-line settings apply."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from llama import LlamaError
from llama.batch import load_work, read_done, run_batch


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _results(path: Path) -> dict:
    """id -> generation; asserts every line is whole JSON and no id repeats."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in {path}: {ids}"
    return {r["id"]: r["generation"] for r in records}


@pytest.mark.subprocess
def test_killed_job_restarts_without_losing_or_repeating_ids(tmp_path, tiny_ckpt, sp_tokenizer, generator):
    prompts = [{"id": f"p{i}", "prompt": f"Item {i}: once upon a time"} for i in range(12)]
    prompts[3]["temperature"] = prompts[8]["temperature"] = 0  # greedy, the rest sampled
    prompts[5]["max_gen_len"] = 4
    inp = _write_jsonl(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    # The `generator` fixture's max_seq_len and max_batch_size, so its run is comparable.
    cmd = [sys.executable, "-m", "llama.batch", "--input", str(inp), "--output", str(out),
           "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", sp_tokenizer, "--temperature", "0.8",
           "--max_gen_len", "24", "--max_seq_len", "64", "--max_batch_size", "4", "--seed", "7"]
    env = dict(os.environ, LLAMA_PROGRESS="0", PYTHONPATH=str(REPO))

    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.stat().st_size > 0):
            assert proc.poll() is None, f"batch job ended early: {proc.communicate()[1]}"
            assert time.time() < deadline, "no result appeared within 120 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert 0 < len(lines) < len(prompts), "the job was not killed midway"
    # As if the kill had also cut the last line in half: its chunk is then only partly written.
    out.write_text("".join(lines[:-1]) + lines[-1][:25], encoding="utf-8")
    before = {r["id"]: r["generation"] for r in map(json.loads, lines[:-1])}

    done = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dropped a truncated last line" in done.stderr
    resumed = _results(out)
    assert sorted(resumed) == sorted(p["id"] for p in prompts)
    assert all(resumed[k] == v for k, v in before.items()), "results written before the kill changed"

    # An uninterrupted run (in this process) writes the very same results, sampled ones too:
    # chunks are cut from the whole input and seeded by number.
    ref = tmp_path / "ref.jsonl"
    run_batch(generator, str(inp), str(ref), defaults=(0.8, 0.9, 24), seed=7)
    assert resumed == _results(ref)
    greedy = generator.text_completion([prompts[3]["prompt"], prompts[8]["prompt"]], temperature=0,
                                       max_gen_len=24)
    assert [resumed["p3"], resumed["p8"]] == [g["generation"] for g in greedy]


def test_per_line_settings_override_the_flags(tmp_path, generator):
    text = "The capital of France is"
    lines = [
        {"id": "sampled", "prompt": text},
        {"id": "greedy", "prompt": text, "temperature": 0},
        {"id": "greedy_short", "prompt": text, "temperature": 0, "max_gen_len": 3},
        {"id": "nucleus_of_one", "prompt": text, "top_p": 1e-9},  # only the likeliest token counts
        {"id": 7, "prompt": "Hi", "temperature": 0, "max_gen_len": 5},  # integer ids work too
    ]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    run_batch(generator, str(inp), str(out), defaults=(1.0, 0.9, 10))
    got = _results(out)

    def greedy(prompt: str, n: int) -> str:
        return generator.text_completion([prompt], temperature=0, max_gen_len=n)[0]["generation"]

    assert got["greedy"] == greedy(text, 10)
    assert got["greedy_short"] == greedy(text, 3)
    # A nucleus of one token leaves nothing to chance, so this line is reproducible.
    assert got["nucleus_of_one"] == generator.text_completion([text], temperature=1.0, top_p=1e-9,
                                                              max_gen_len=10)[0]["generation"]
    assert got[7] == greedy("Hi", 5)
    assert set(got) == {"sampled", "greedy", "greedy_short", "nucleus_of_one", 7}


def test_chat_lines_and_logprobs(tmp_path, generator):
    dialogs = [[{"role": "user", "content": "Hello!"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": i, "dialog": d} for i, d in enumerate(dialogs)])
    out = tmp_path / "out.jsonl"
    run_batch(generator, str(inp), str(out), chat=True, defaults=(0.0, 0.9, 6), logprobs=True)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    expected = generator.chat_completion(dialogs, temperature=0, max_gen_len=6, logprobs=True)
    for i, e in enumerate(expected):
        assert records[i]["generation"] == e["generation"]["content"]
        assert records[i]["tokens"] == e["tokens"]
        assert "".join(records[i]["tokens"]) == records[i]["generation"]  # the tokens' texts join to it
        assert records[i]["logprobs"] == pytest.approx(e["logprobs"], abs=1e-5)


@pytest.mark.parametrize("lines, chat, message", [
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}', '{"id": 1, "prompt": "c"}'], False,
     "line 3: id 1 is already used on line 1"),
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"'], False, "line 2 is not valid JSON"),
    (['{"id": 1, "dialog": [{"role": "user", "content": "hi"}]}'], False, "(dialogs need --chat)"),
    (['{"id": 1, "prompt": "a"}'], True, 'line 1 (id 1) has no "dialog"'),
    (['{"id": 1, "dialog": [{"role": "bot", "content": "hi"}]}'], True, "unknown role 'bot'"),
    (['{"id": 1, "prompt": "a", "top_p": 0}'], False, "line 1 (id 1): top_p=0"),
    (['{"id": 1, "prompt": "a", "max_gen_len": 2.5}'], False, "line 1 (id 1): max_gen_len=2.5"),
    (['["not", "an", "object"]'], False, 'line 1 must be a JSON object with an "id"'),
    (['{"id": [1], "prompt": "a"}'], False, "id [1] must be a string or an integer"),
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b", "top_k": -1}'], False,
     "line 2 (id 2): top_k=-1 must be an integer >= 0"),
    (['{"id": 1, "prompt": "a", "min_p": 2}'], False, "line 1 (id 1): min_p=2 must be a finite number from 0 to 1"),
    (['{"id": 1, "prompt": "a", "presence_penalty": 2.5}'], False, "line 1 (id 1): presence_penalty=2.5"),
    (['{"id": 1, "prompt": "a", "frequency_penalty": "1"}'], False, "line 1 (id 1): frequency_penalty='1'"),
    (['{"id": 1, "prompt": "a", "repetition_penalty": 0}'], False, "line 1 (id 1): repetition_penalty=0"),
    (['{"id": 1, "prompt": "a", "logit_bias": [1]}'], False, "line 1 (id 1): logit_bias=[1] must be a dict"),
    (['{"id": 1, "prompt": "a", "logit_bias": {"x1": 1}}'], False, "line 1 (id 1): logit_bias key='x1'"),
    (['{"id": 1, "prompt": "a", "logit_bias": {"1": 200}}'], False, "line 1 (id 1): logit_bias value=200"),
    (['{"id": 1, "prompt": "a", "stop": 5}'], False, "line 1 (id 1): stop=5 must be a string or a list"),
    (['{"id": 1, "prompt": "a", "stop": ["x", null]}'], False, "line 1 (id 1): stop[1] must be text"),
    (['{"id": 1, "prompt": "a", "temprature": 0}'], False,
     "line 1 (id 1) has the unknown field 'temprature'; a line may hold only id, prompt, temperature, top_p"),
    (['{"id": 1, "prompt": "a", "dialog": []}'], False, "unknown field 'dialog' (dialogs need --chat)"),
    (['{"id": 1, "dialog": [{"role": "user", "content": "hi"}], "prompt": "a"}'], True,
     "unknown field 'prompt' (plain prompts run without --chat)"),
])
def test_bad_input_lines_are_named(tmp_path, lines, chat, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    with pytest.raises(LlamaError, match="in.jsonl") as err:
        load_work(str(inp), str(tmp_path / "out.jsonl"), chat, (0.6, 0.9, None))
    assert message in str(err.value)


def test_dialog_shapes_are_the_chat_formats_to_judge(tmp_path, generator):
    """Two user turns in a row pass the reading (Llama 3 and ChatML take them); the Llama 2
    model refuses them, naming the line, before anything is generated or written."""
    dialog = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "dialog": dialog}, {"id": 2, "dialog": dialog[:1]}])
    out = tmp_path / "out.jsonl"
    assert len(load_work(str(inp), str(out), True, (0.6, 0.9, None))[0]) == 2
    with pytest.raises(LlamaError, match=r"in.jsonl line 1 \(id 1\): dialog 0, message 1 has role 'user' "
                                         r"where 'assistant' was expected"):
        run_batch(generator, str(inp), str(out), chat=True)
    assert not out.exists() or out.read_text() == ""


def test_output_that_is_not_ours_is_refused_untouched(tmp_path):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    for content in ("some notes\nof the user", '{"id": 1, "generation": "x"}\nplain text\n'):
        out = tmp_path / "out.jsonl"
        out.write_text(content)
        with pytest.raises(LlamaError, match="is not a result of llama.batch"):
            load_work(str(inp), str(out), False, (0.6, 0.9, None))
        assert out.read_text() == content
    with pytest.raises(LlamaError, match="is the input file"):
        load_work(str(inp), str(inp), False, (0.6, 0.9, None))


def test_whole_last_line_without_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "generation": "a"}\n{"id": "2", "generation": "b"}')
    assert read_done(str(out)) == {"1", '"2"'}
    assert out.read_text().endswith('"b"}\n')


def test_prompt_too_long_is_named_before_any_work(tmp_path, generator):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": "short", "prompt": "Hi"},
                                               {"id": "long", "prompt": "word " * 100}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(LlamaError, match=r"in.jsonl line 2 \(id 'long'\): the prompt has \d+ tokens"):
        run_batch(generator, str(inp), str(out), defaults=(0.0, 0.9, 4))
    assert not out.exists()


def test_lines_with_stop_strings_and_controls_get_what_the_library_gives(tmp_path, generator):
    text, n = "Once upon a time", 20
    free = generator.text_completion([text], temperature=0, max_gen_len=n)[0]["generation"]
    words = [w for w in free.split() if w.isascii() and w.isalpha() and len(w) >= 3]
    stop = words[len(words) // 2][:3]
    paris = generator.tokenizer.encode("Paris", bos=False, eos=False)[0]
    penalties = dict(logit_bias={str(paris): 15}, repetition_penalty=3.0, frequency_penalty=1.0)
    lines = [
        {"id": "stop", "prompt": text, "temperature": 0, "stop": stop},
        {"id": "stops", "prompt": text, "temperature": 0, "stop": ["\u0000", stop]},
        {"id": "bias", "prompt": text, "temperature": 0, "max_gen_len": 3, "logit_bias": {str(paris): 100}},
        {"id": "penalties", "prompt": text, "temperature": 0, **penalties},
        {"id": "top_k_1", "prompt": text, "temperature": 1.0, "top_k": 1, "min_p": 0.5, "presence_penalty": 0},
        {"id": "plain", "prompt": text, "temperature": 0},
    ]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    run_batch(generator, str(inp), str(out), defaults=(1.0, 0.9, n), logprobs=True)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    cut = generator.text_completion([text], temperature=0, max_gen_len=n, logprobs=True, stop=[stop])[0]
    assert records["stop"]["generation"] == records["stops"]["generation"] == free[: free.find(stop)]
    for key in ("generation", "tokens"):
        assert records["stop"][key] == cut[key]  # tokens up to the one that completed the stop string
    assert records["stop"]["logprobs"] == pytest.approx(cut["logprobs"], abs=1e-5)
    assert len(records["stop"]["tokens"]) < n  # its row was freed early
    assert records["bias"]["generation"] == "Paris Paris Paris"
    assert records["penalties"]["generation"] == generator.text_completion(
        [text], temperature=0, max_gen_len=n, logit_bias={paris: 15}, repetition_penalty=3.0,
        frequency_penalty=1.0)[0]["generation"] != free
    assert records["top_k_1"]["generation"] == records["plain"]["generation"] == free


def test_logit_bias_outside_the_vocabulary_is_named_before_any_work(tmp_path, generator):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": "ok", "prompt": "Hi"},
                                               {"id": "big", "prompt": "Hi", "logit_bias": {"32000": 1}}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(LlamaError, match=r"in.jsonl line 2 \(id 'big'\): logit_bias key=32000 must be an integer "
                                         r"from 0 to 31999"):
        run_batch(generator, str(inp), str(out), defaults=(0.0, 0.9, 4))
    assert not out.exists() or out.read_text() == ""


def test_n_samples_per_line_prefilled_once_each_with_its_own_key(tmp_path, generator):
    """A line with "n" gets that many samples under "samples" (the first again as "generation"),
    sample j sampled with the line's key for j (sample 0 with the key a line without "n" has),
    its prompt prefilled once."""
    import torch

    from llama.batch import job_key
    from llama.detokenize import token_texts
    from llama.runtime.engine import Request

    text = "A line whose samples share one prefill of this prompt, which is long enough to share."
    lines = [{"id": "three", "prompt": text, "n": 3, "temperature": 1.0},
             {"id": "one", "prompt": text, "temperature": 1.0},
             {"id": "n1", "prompt": text, "n": 1, "temperature": 1.0}]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    stats = generator.engine.stats
    before = stats.prefill_tokens
    run_batch(generator, str(inp), str(out), defaults=(1.0, 0.9, 6), logprobs=True, seed=5)
    prompt = generator.tokenizer.encode(text, bos=True, eos=False)
    assert stats.prefill_tokens - before <= len(prompt) + 4  # once, then the last token of each other request
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    three = records["three"]
    assert len(three["samples"]) == 3 and three["generation"] == three["samples"][0]["generation"]
    assert len({s["generation"] for s in three["samples"]}) > 1
    assert "samples" not in records["one"] and len(records["n1"]["samples"]) == 1
    for j, sample in enumerate(three["samples"]):
        request = Request(prompt, 6, 1.0, 0.9, job_key(5, "three", j), tuple(generator.tokenizer.stop_tokens), True)
        alone = dict(generator.complete([request]))[0]
        assert sample["tokens"] == token_texts(generator.tokenizer, alone.tokens)
        torch.testing.assert_close(sample["logprobs"], alone.logprobs, rtol=0, atol=1e-5)
    # sample 0 has the key of the same line without "n"
    inp = _write_jsonl(tmp_path / "single.jsonl", [{"id": "three", "prompt": text, "temperature": 1.0}])
    run_batch(generator, str(inp), str(tmp_path / "single-out.jsonl"), defaults=(1.0, 0.9, 6), logprobs=True, seed=5)
    assert json.loads((tmp_path / "single-out.jsonl").read_text())["tokens"] == three["samples"][0]["tokens"]
    for bad in (0, 129, "2", True):
        inp = _write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "prompt": text, "n": bad}])
        with pytest.raises(LlamaError, match=rf"line 1 \(id 1\): n={bad!r}"):
            run_batch(generator, str(inp), str(tmp_path / "bad-out.jsonl"))
