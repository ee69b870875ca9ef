"""Text that is not valid Unicode (a lone surrogate such as "a\\ud800", or byte 0xE9 from a
terminal or file that is not UTF-8) is refused with a LlamaError naming where it was and at
which character, at every entry point: each tokenizer kind's encode, the text API, dialog
contents, the system prompt, batch input lines, and the chat REPL, which keeps its
conversation. Valid text of any script passes unchanged."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO
from llama import LlamaError, Tokenizer
from llama.batch import load_work
from llama.chat import ChatSession
from llama.checkpoint.convert.gguf_tokenizer import hf_tokenizer_json_from_gguf_vocab
from llama.utils.assets import LLAMA3_TOKENIZER, fetch_wheel_file

# (text, character index of the bad character, how the message describes it)
INVALID = [("a\ud800", 1, "a lone surrogate U+D800"),
           ("\udfffhello", 0, "a lone surrogate U+DFFF"),
           ("caf\udce9 au lait", 3, "byte 0xE9")]  # how Python keeps a Latin-1 "é" read as UTF-8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, sp_tokenizer):
    """One tokenizer of each kind: sentencepiece, Meta's tiktoken, an HF tokenizer.json."""
    folder = tmp_path_factory.mktemp("hf_tok")
    tokens = ["a", "b", "c", "ab", "<|im_start|>", "<|im_end|>"]
    (folder / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        tokens, ["a b"], [1, 1, 1, 1, 3, 3], 4, 5, "default"))
    return {"sentencepiece": Tokenizer(sp_tokenizer),
            "tiktoken": Tokenizer(str(fetch_wheel_file(*LLAMA3_TOKENIZER))),
            "hf": Tokenizer(str(folder / "tokenizer.json"))}


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf"])
@pytest.mark.parametrize("text, index, what", INVALID)
def test_every_tokenizer_refuses_invalid_text_naming_the_character(tokenizers, kind, text, index, what):
    with pytest.raises(LlamaError, match=rf"not valid Unicode text: {re.escape(what)} at character {index} "):
        tokenizers[kind].encode(text, bos=True, eos=False)


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_valid_text_of_any_script_is_unchanged(tokenizers, kind):
    text = "Grüße, 日本語, emoji 🦙🎉, combining é, Ελληνικά"
    tok = tokenizers[kind]
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_text_api_refuses_invalid_prompts(generator):
    with pytest.raises(LlamaError, match=r"not valid Unicode text: a lone surrogate U\+D800 at character 1"):
        generator.text_completion(["fine", "a\ud800"], max_gen_len=2)
    with pytest.raises(LlamaError, match="byte 0xE9 at character 3"):
        generator.stream_completion("caf\udce9", max_gen_len=2)


def test_dialog_contents_are_checked_with_their_place(generator):
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "x\ud800"}]
    with pytest.raises(LlamaError, match=r"dialog 1, message 2: content is not valid Unicode text: "
                                         r"a lone surrogate U\+D800 at character 1"):
        generator.chat_completion([[{"role": "user", "content": "ok"}], dialog], max_gen_len=2)
    with pytest.raises(LlamaError, match="dialog 0, message 2: content is not valid Unicode"):
        generator.stream_chat(dialog, max_gen_len=2)
    with pytest.raises(LlamaError, match="--system is not valid Unicode text: byte 0xE9 at character 0"):
        ChatSession(generator, system="\udce9t\u00e9")


@pytest.mark.parametrize("line, chat, message", [
    ('{"id": 2, "prompt": "a\\ud800"}', False, r'line 2 \(id 2\): "prompt" is not valid Unicode text: '
                                               r"a lone surrogate U\+D800 at character 1"),
    ('{"id": 2, "dialog": [{"role": "user", "content": "\\udc80"}]}', True,
     r"line 2 \(id 2\): dialog 0, message 0: content is not valid Unicode text: byte 0x80 at character 0"),
    ('{"id": "\\ud83d", "prompt": "ok"}', False, "line 2: the id is not valid Unicode text"),
])
def test_batch_lines_with_invalid_text_are_named_before_any_work(tmp_path, line, chat, message):
    field = "dialog" if chat else "prompt"
    first = {"id": 1, field: [{"role": "user", "content": "fine"}] if chat else "fine"}
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(LlamaError, match=message):
        load_work(str(inp), str(tmp_path / "out.jsonl"), chat, (0.6, 0.9, None))


# ---- the chat REPL ---------------------------------------------------------------------------

def _chat_cmd(tiny_ckpt, sp_tokenizer):
    return [sys.executable, "-m", "llama.chat", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", sp_tokenizer,
            "--temperature", "0", "--max_gen_len", "4", "--max_seq_len", "64"]


def _prompt_tokens(generator, *contents: str) -> int:
    roles = ["user", "assistant"] * len(contents)
    return len(generator.formatter.encode_dialog_prompt([{"role": r, "content": c} for r, c in zip(roles, contents)]))


@pytest.mark.subprocess
def test_repl_refuses_a_latin1_byte_typed_at_the_terminal_and_keeps_the_conversation(
        tmp_path, tiny_ckpt, sp_tokenizer, generator):
    """Through a real terminal (pty): a Latin-1 terminal sends "é" as the single byte 0xE9
    (readline passes it on with input-meta on, as many systems configure)."""
    pexpect = pytest.importorskip("pexpect")
    from helpers import TIMING_LINE

    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set input-meta on\nset convert-meta off\nset output-meta on\n")
    env = dict(os.environ, TERM="dumb", LLAMA_PROGRESS="0", PYTHONPATH=str(REPO), LC_ALL="C", LANG="C",
               INPUTRC=str(inputrc))
    cmd = _chat_cmd(tiny_ckpt, sp_tokenizer)
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(REPO), env=env, timeout=120, dimensions=(40, 250))
    try:
        child.expect_exact(b"> ")
        child.sendline(b"Hello")
        child.expect(TIMING_LINE.pattern.encode())
        child.expect_exact(b"> ")
        child.send(b"caf\xe9\n")
        child.expect(rb"error: this message is not valid Unicode text: byte 0xE9 at character 3 .*"
                     rb"set the terminal or file to UTF-8.*\(the conversation is kept\)")
        child.expect_exact(b"> ")
        child.sendline(b"And now?")
        child.expect(TIMING_LINE.pattern.encode())
        asked = int(child.match.group(1))
        child.expect_exact(b"> ")
        child.sendline(b"/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # The last question was asked with the first exchange still in the prompt.
    reply = generator.chat_completion([[{"role": "user", "content": "Hello"}]], temperature=0,
                                      max_gen_len=4)[0]["generation"]["content"]
    assert asked == _prompt_tokens(generator, "Hello", reply, "And now?")


@pytest.mark.subprocess
def test_repl_reading_a_pipe_with_strict_decoding_goes_on_after_a_bad_line(tiny_ckpt, sp_tokenizer):
    """stdin decoded strictly (PYTHONIOENCODING=utf-8:strict): input() itself would fail."""
    env = dict(os.environ, LLAMA_PROGRESS="0", PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8:strict")
    done = subprocess.run(_chat_cmd(tiny_ckpt, sp_tokenizer), input=b"caf\xe9\nHello\n/exit\n", cwd=str(REPO),
                          env=env, capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 0, err[-2000:]
    assert "error: this message is not valid Unicode text: byte 0xE9 at character 3" in err
    assert "Traceback" not in err and err.count("prompt tokens") == 1  # "Hello" was answered


def test_the_detokenizer_decodes_each_token_a_bounded_number_of_times(sp_tokenizer):
    """A long answer costs time linear in its length: the tokens decoded over the whole stream
    (every take(), and the one whole decode of finish()) stay within a small multiple of its
    length, where decoding everything again after each token would cost n^2 / 2. The text is
    still exactly the whole sequence's decode."""
    from llama.detokenize import Detokenizer
    from llama.tokenizer import Tokenizer

    tokenizer = Tokenizer(sp_tokenizer)
    decoded = []
    real_decode = tokenizer.decode
    tokenizer.decode = lambda ids: decoded.append(len(ids)) or real_decode(ids)
    context = tokenizer.encode("Once upon a time", bos=True, eos=False)
    answer = tokenizer.encode("Café au lait, naïve façade; 日本語 and more. " * 60, bos=False, eos=False)
    stream = Detokenizer(tokenizer, context=context, stops=["never appears"])
    pieces = []
    for token in answer:
        stream.add(token)
        pieces.append(stream.take())
    pieces.append(stream.finish())
    assert "".join(pieces) == real_decode(context + answer)[len(real_decode(context)):]
    n = len(answer)
    assert n > 1000 and sum(decoded) < 8 * n, (sum(decoded), n)
