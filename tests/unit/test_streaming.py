"""Streaming: the pieces of stream_completion / stream_chat join to exactly what
text_completion / chat_completion return (greedy and seeded sampling), on the tiny model, on
the demo model with multi-byte text, and under torchrun with two ranks. The one torchrun
launch also runs the chat REPL and a batch job, since those must behave alike on every rank.

Run as a script (`torchrun ... tests/test_streaming.py SPEC.json`), this file is the worker.
"""

import contextlib
import importlib.util
import io
import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, when this file runs as the torchrun worker
from helpers import REPO, TIMING_LINE  # noqa: E402
from helpers.processes import run_torchrun  # noqa: E402

PROMPTS = ["The capital of France is", "Hi", "Once upon a time, in a land far, far away, there lived a"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
CHAT_SCRIPT = ["Hello there!", "What did I just say?", "/reset", "Hi", "/exit", "never read"]
MAX_GEN_LEN = 10
SEED = 4321


@contextlib.contextmanager
def _kept_rng():
    """Builds and sampling move the global RNG; leave it as other tests expect it."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _seeded(seed: int, fn):
    torch.manual_seed(seed)
    return fn()


# ---- in one process --------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_completion_joins_to_text_completion(generator, temperature):
    with _kept_rng():
        for i, prompt in enumerate(PROMPTS):
            pieces = _seeded(SEED + i, lambda: list(generator.stream_completion(
                prompt, temperature=temperature, top_p=0.9, max_gen_len=16)))
            streamed_tokens = generator.last_stats.generated_tokens
            full = _seeded(SEED + i, lambda: generator.text_completion(
                [prompt], temperature=temperature, top_p=0.9, max_gen_len=16)[0]["generation"])
            assert "".join(pieces) == full
            assert len(pieces) > 1 and all(pieces), "streamed in several non-empty pieces"
            assert streamed_tokens == generator.last_stats.generated_tokens


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_chat_joins_to_chat_completion(generator, temperature):
    with _kept_rng():
        pieces = _seeded(SEED, lambda: list(generator.stream_chat(DIALOG, temperature, 0.9, 12)))
        full = _seeded(SEED, lambda: generator.chat_completion([DIALOG], temperature, 0.9, 12))
        assert "".join(pieces) == full[0]["generation"]["content"]


@pytest.fixture(scope="module")
def demo():
    """The real demo chat model (byte-level BPE: one character may span several tokens)."""
    from llama import Llama
    from llama.demo import ensure_demo

    with _kept_rng():
        return Llama.build(str(ensure_demo(quiet=True)), max_seq_len=128, max_batch_size=1, device="cpu")


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_demo_streams_japanese_whole_characters(demo, temperature):
    dialog = [{"role": "user", "content": "Say hello in Japanese."}]
    with _kept_rng():
        pieces = _seeded(SEED, lambda: list(demo.stream_chat(dialog, temperature, 0.9, 8)))
        full = _seeded(SEED, lambda: demo.chat_completion([dialog], temperature, 0.9, 8,
                                                          logprobs=True))[0]
    text = full["generation"]["content"]
    assert "".join(pieces) == text
    assert any(ord(c) > 0x3000 for c in text), f"expected Japanese, got {text!r}"
    # Characters really were split across tokens, yet no piece holds half of one.
    assert any("\ufffd" in t for t in full["tokens"])
    assert "\ufffd" not in text and not any("\ufffd" in p for p in pieces)


def test_demo_streams_emoji(demo):
    prompt = "Emoji story: \U0001F436"
    pieces = list(demo.stream_completion(prompt, temperature=0, max_gen_len=8))
    full = demo.text_completion([prompt], temperature=0, max_gen_len=8, logprobs=True)[0]
    assert "".join(pieces) == full["generation"]
    assert any(ord(c) > 0xFFFF for c in full["generation"]), "expected emoji"
    assert any("\ufffd" in t for t in full["tokens"])
    # Only a character the model left unfinished at the very end may show as U+FFFD.
    assert not any("\ufffd" in p for p in pieces[:-1])


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["example_text_completion", "example_chat_completion"])
def test_example_script_stream_prints_the_same(script, tiny_ckpt, sp_tokenizer, capsys):
    main = _load_script(script).main
    args = dict(ckpt_dir=str(tiny_ckpt), tokenizer_path=sp_tokenizer, temperature=0, max_seq_len=64,
                max_gen_len=8)
    with _kept_rng():
        main(**args)
        batched = capsys.readouterr()
        main(**args, stream=True)
        streamed = capsys.readouterr()
    def answers(out: str) -> str:  # all but the load-time line
        return "".join(line for line in out.splitlines(True) if not line.startswith("Loaded in"))

    assert answers(streamed.out) == answers(batched.out) and "==========" in streamed.out
    assert [TIMING_LINE.fullmatch(line) is not None for line in batched.err.splitlines()] == [True]
    assert [TIMING_LINE.fullmatch(line) is not None for line in streamed.err.splitlines()] == [True] * 3


# ---- two ranks under torchrun ---------------------------------------------------------------

def _worker(spec_path: str) -> None:
    """One rank: stream, chat and batch on the 2-shard tiny model; dump to OUT/rank{R}.json."""
    from llama import Llama
    from llama.batch import run_batch
    from llama.chat import ChatSession, repl

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    report: dict = {}
    try:
        gen = Llama.build(spec["ckpt"], spec["tokenizer"], max_seq_len=64, max_batch_size=4,
                          device="cpu", dtype="fp32")
        report["world_size"] = gen.ctx.world_size
        report["stream_greedy"] = [list(gen.stream_completion(p, 0.0, 0.9, MAX_GEN_LEN)) for p in PROMPTS]
        report["text_greedy"] = [c["generation"] for c in gen.text_completion(PROMPTS, 0.0, 0.9, MAX_GEN_LEN)]
        report["stream_sampled"] = [_seeded(SEED + i, lambda: list(gen.stream_completion(p, 0.8, 0.9, MAX_GEN_LEN)))
                                    for i, p in enumerate(PROMPTS)]
        report["text_sampled"] = [_seeded(SEED + i, lambda: gen.text_completion([p], 0.8, 0.9, MAX_GEN_LEN)[0]
                                          ["generation"]) for i, p in enumerate(PROMPTS)]
        report["stream_chat"] = list(gen.stream_chat(DIALOG, 0.0, 0.9, MAX_GEN_LEN))

        lines = iter(CHAT_SCRIPT)
        out, err = io.StringIO(), io.StringIO()
        session = ChatSession(gen, temperature=0.0, max_gen_len=MAX_GEN_LEN)
        with contextlib.redirect_stdout(out if rank == 0 else sys.stdout), \
                contextlib.redirect_stderr(err if rank == 0 else sys.stderr):
            repl(gen, session, lambda: next(lines))
        report.update(chat_turns=session.turns, chat_out=out.getvalue(), chat_err=err.getvalue())

        run_batch(gen, spec["batch_in"], spec["batch_out"], defaults=(0.0, 0.9, MAX_GEN_LEN))
    except BaseException:
        report["error"] = traceback.format_exc()
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(report))
    if "error" in report:
        sys.stderr.write(f"rank {rank} failed:\n{report['error']}")
        sys.exit(1)


@pytest.fixture(scope="module")
def mp2(tmp_path_factory, tiny_ckpt_mp2, sp_tokenizer):
    """One torchrun launch with two ranks over gloo; each rank's report and the launcher's output."""
    work = tmp_path_factory.mktemp("stream_mp2")
    batch_in = work / "in.jsonl"
    batch_in.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    spec = {"ckpt": str(tiny_ckpt_mp2), "tokenizer": sp_tokenizer, "out": str(work),
            "batch_in": str(batch_in), "batch_out": str(work / "out.jsonl")}
    (work / "spec.json").write_text(json.dumps(spec))
    job = run_torchrun(Path(__file__), [work / "spec.json"], timeout_s=180, LLAMA_DIST_TIMEOUT="120",
                       LLAMA_PROGRESS="0")
    stdout, stderr = job["stdout"], job["stderr"]
    logs = f"exit {job['rc']}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    assert job["rc"] == 0, f"torchrun failed: {logs}"
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "stdout": stdout, "stderr": stderr, "batch_out": work / "out.jsonl",
            "batch_in": batch_in}


@pytest.fixture(scope="module")
def mp1(tiny_ckpt, sp_tokenizer):
    """The same model in this process (world of one), fp32 like the workers."""
    from llama import Llama

    with _kept_rng():
        return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu",
                           dtype="fp32")


def test_mp2_streams_what_it_generates(mp2):
    for rank, r in enumerate(mp2["ranks"]):
        assert r["world_size"] == 2
        assert ["".join(p) for p in r["stream_greedy"]] == r["text_greedy"], f"rank {rank} greedy"
        assert ["".join(p) for p in r["stream_sampled"]] == r["text_sampled"], f"rank {rank} sampled"
    r0, r1 = mp2["ranks"]
    for key in ("stream_greedy", "stream_sampled", "stream_chat"):
        assert r0[key] == r1[key], f"ranks stream different pieces ({key})"


def test_mp2_stream_matches_mp1(mp2, mp1):
    r0 = mp2["ranks"][0]
    with _kept_rng():
        expected = [mp1.text_completion([p], 0.0, 0.9, MAX_GEN_LEN)[0]["generation"] for p in PROMPTS]
        chat = mp1.chat_completion([DIALOG], 0.0, 0.9, MAX_GEN_LEN)[0]["generation"]["content"]
    assert ["".join(p) for p in r0["stream_greedy"]] == expected
    assert "".join(r0["stream_chat"]) == chat


def test_mp2_chat_repl_runs_alike_on_every_rank(mp2, mp1, capsys):
    from llama.chat import ChatSession, repl

    r0, r1 = mp2["ranks"]
    lines = iter(CHAT_SCRIPT)
    session = ChatSession(mp1, temperature=0.0, max_gen_len=MAX_GEN_LEN)
    repl(mp1, session, lambda: next(lines))
    printed = capsys.readouterr()
    assert r0["chat_turns"] == r1["chat_turns"] == session.turns
    assert [m["content"] for m in session.turns if m["role"] == "user"] == ["Hi"]  # after /reset
    assert r0["chat_out"] == printed.out
    assert r0["chat_err"].count("(conversation cleared)") == 1
    # Rank 1 printed nothing (rank 0's output went to the report instead).
    assert "(conversation cleared)" not in mp2["stderr"]
    assert "prompt tokens," not in mp2["stderr"]


def test_mp2_batch_job_written_once_by_rank0(mp2, mp1, tmp_path):
    from llama.batch import run_batch

    got = [json.loads(line) for line in mp2["batch_out"].read_text().splitlines()]
    ref = tmp_path / "ref.jsonl"
    with _kept_rng():
        run_batch(mp1, str(mp2["batch_in"]), str(ref), defaults=(0.0, 0.9, MAX_GEN_LEN))
    assert sorted(r["id"] for r in got) == list(range(len(PROMPTS)))
    assert got == [json.loads(line) for line in ref.read_text().splitlines()]


if __name__ == "__main__":
    _worker(sys.argv[1])
