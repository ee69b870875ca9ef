"""python -m llama.chat: a real terminal session (pexpect) with the demo model, and the REPL's
history handling in-process (trimming to max_seq_len, /reset, end of input, interrupts)."""

import io
import os
import sys

import pytest
import torch

from helpers import REPO, TIMING_LINE
from helpers.processes import run_torchrun
from llama.chat import ChatSession, read_stdin, repl

MAX_GEN_LEN = 10


@pytest.fixture(scope="module")
def demo():
    """The demo model as `python -m llama.chat` builds it (batch 1)."""
    from llama import Llama
    from llama.demo import ensure_demo

    state = torch.get_rng_state()
    try:
        return Llama.build(str(ensure_demo(quiet=True)), max_seq_len=256, max_batch_size=1)
    finally:
        torch.set_rng_state(state)


def test_terminal_session_two_turns_reset_exit(demo):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, TERM="dumb", LLAMA_PROGRESS="0", PYTHONPATH=str(REPO))
    child = pexpect.spawn(sys.executable, ["-m", "llama.chat", "--temperature", "0", "--max_gen_len",
                                           str(MAX_GEN_LEN)], cwd=str(REPO), env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 250))

    def ask(message: str):
        """Send a message; return (reply as printed, prompt tokens reported)."""
        child.expect_exact("> ")
        child.sendline(message)
        child.expect(TIMING_LINE)
        printed = child.before.replace("\r\n", "\n")
        # First use on the machine: one note (on stderr, the same terminal) says what is measured.
        printed = "".join(line for line in printed.splitlines(keepends=True) if not line.startswith("llama: "))
        assert printed.startswith(message + "\n")  # the terminal's echo of what was typed
        return printed[len(message) + 1: -1], int(child.match.group(1))

    def prompt_tokens(*contents: str) -> int:
        roles = ["user", "assistant"] * len(contents)
        dialog = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        return len(demo.formatter.encode_dialog_prompt(dialog))

    try:
        q1, q2 = "What is the capital of France?", "And of Germany?"
        reply1, n1 = ask(q1)
        assert reply1 == demo.chat_completion([[{"role": "user", "content": q1}]], temperature=0,
                                              max_gen_len=MAX_GEN_LEN)[0]["generation"]["content"]
        assert "Paris" in reply1 and n1 == prompt_tokens(q1)
        # The second turn is asked with the first exchange in the prompt, and it shows.
        reply2, n2 = ask(q2)
        assert n2 == prompt_tokens(q1, reply1, q2)
        assert "Berlin" in reply2
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        assert ask(q2)[1] == prompt_tokens(q2)
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def _run(generator, lines, **session_args) -> ChatSession:
    script = iter(lines)
    session = ChatSession(generator, **session_args)
    repl(generator, session, lambda: next(script))
    return session


def test_history_too_long_drops_oldest_turns_instead_of_crashing(generator, capsys):
    messages = [f"Tell me fact number {i} about the sea." for i in range(6)]
    session = _run(generator, messages + ["word " * 80, "/foo", "", "One more?", None],
                   temperature=0.0, max_gen_len=8)
    err = capsys.readouterr().err
    assert "dropped the oldest" in err
    assert "error: this message makes a prompt of" in err and "--max_seq_len=64" in err
    assert "unknown command /foo" in err
    assert len(TIMING_LINE.findall(err)) == len(messages) + 1  # every short message was answered
    assert session.turns[-2] == {"role": "user", "content": "One more?"}
    assert session.turns[0]["content"] != messages[0]  # the oldest went
    prompt = generator.formatter.encode_dialog_prompt(session.turns[:-1])
    assert len(prompt) + session.reply_room <= 64


def test_reset_keeps_the_system_prompt(generator, capsys):
    session = _run(generator, ["Hello!", "/reset", "Hi!", "/exit"], system="Be brief.",
                   temperature=0.0, max_gen_len=4)
    assert [m["content"] for m in session.turns if m["role"] == "user"] == ["Hi!"]
    assert session.dialog("x")[0] == {"role": "system", "content": "Be brief."}
    assert "(conversation cleared)" in capsys.readouterr().err


def test_interrupted_reply_is_not_kept(generator, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        yield "Once"
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "stream_chat", interrupted)
    session = _run(generator, ["Tell me a long story.", "/exit"], temperature=0.0)
    out = capsys.readouterr()
    assert out.out.startswith("Once") and "(reply interrupted" in out.err
    assert session.turns == []


def test_end_of_input_quits(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert read_stdin() is None
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert read_stdin() == "hello"


def test_an_unexpected_error_in_one_reply_keeps_the_conversation(generator, capsys, monkeypatch):
    session = ChatSession(generator, temperature=0.0, max_gen_len=4)
    real_stream_chat = generator.stream_chat
    calls = []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("some bug")
        return real_stream_chat(*args, **kwargs)

    monkeypatch.setattr(generator, "stream_chat", broken_once)
    script = iter(["Hello!", "Tell me more.", "Bye!", None])
    repl(generator, session, lambda: next(script))
    err = capsys.readouterr().err
    assert "error: RuntimeError: some bug (a bug in llama: please report it; the reply is not kept" in err
    assert [m["content"] for m in session.turns if m["role"] == "user"] == ["Hello!", "Bye!"]


@pytest.mark.torchrun
@pytest.mark.slow
def test_two_ranks_wait_for_a_slow_typist_in_bounded_steps(tiny_ckpt, sp_tokenizer, tmp_path):
    """Rank 0's user types for 6 s while every wait of the REPL is bounded to 2 s
    (LLAMA_DIST_TIMEOUT): the other rank keeps waiting in bounded steps, then both answer."""
    typing_s = 6
    job = run_torchrun(REPO / "tests" / "helpers" / "workers" / "repl_worker.py", [tiny_ckpt, sp_tokenizer, typing_s, tmp_path],
                       timeout_s=120, LLAMA_DIST_TIMEOUT="60")
    assert job["rc"] == 0, job["stderr"][-4000:]
    for rank in range(2):
        seconds, turns = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert float(seconds) >= 2 * typing_s and turns == "2"  # two lines typed; one exchange kept
