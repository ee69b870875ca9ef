"""Llama 3.1 tool calling against Meta's own code and documents (llama-models 0.3.0, the wheel
the suite already fetches for the Llama 3 tokenizer): the tool prompt equals the JSON
tool-calling example of its Llama 3.1 prompt-format document, dialogs holding tool calls and
tool results encode to the token ids its ChatFormat gives, and answers are read into the
same tool calls its decoder reads."""

import datetime
import re
import sys
import zipfile
from pathlib import Path

import pytest

from llama.chat_format import Llama3ChatFormat, make_chat_format
from llama.errors import LlamaError
from llama.tokenizer import Tokenizer
from llama.tool_calls import call_prefix, check_tool_choice, check_tools, might_be_call, parse_tool_call
from llama.utils.assets import LLAMA3_TOKENIZER, fetch_wheel

pytest.importorskip("pydantic")
pytest.importorskip("PIL")

SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "description": "The number of songs to return"},
        "genre": {"type": "string", "description": "The genre of the songs to return"}},
        "required": ["n"]}}}


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """llama-models 0.3.0, unpacked and importable: (the package's folder, its modules)."""
    folder = tmp_path_factory.mktemp("llama_models")
    with zipfile.ZipFile(fetch_wheel(LLAMA3_TOKENIZER[0])) as wheel:
        wheel.extractall(folder)
    sys.path.insert(0, str(folder))
    try:
        from llama_models import datatypes
        from llama_models.llama3 import chat_format, tokenizer
    finally:
        sys.path.remove(str(folder))
    return folder / "llama_models", datatypes, chat_format, tokenizer


@pytest.fixture(scope="module")
def ours(llama3_tokenizer) -> Llama3ChatFormat:
    return make_chat_format(Tokenizer(str(llama3_tokenizer)))


def test_the_tool_prompt_is_the_prompt_format_documents_example(meta, ours):
    """Meta's document shows the whole prompt for one tool, a system message and a question."""
    document = (meta[0] / "llama3_1" / "prompt_format.md").read_text()
    section = document.split("## JSON based tool calling", 1)[1]
    example = re.search(r"##### Input Prompt Format\n```\n(.*?)```", section, re.DOTALL).group(1)
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Use tools to get latest trending songs"}]
    tokens = ours.encode_dialog_prompt(dialog, tools=[SONGS], today=datetime.date(2024, 9, 21))
    assert ours.tokenizer.decode(tokens) == example[:-1]  # less the newline before the closing fence
    # The special tokens are control tokens, the rest plain text.
    assert tokens.count(ours.tokenizer.special_tokens["<|eot_id|>"]) == 3


def test_dialogs_with_calls_and_results_encode_as_llama_models(meta, ours, llama3_tokenizer):
    _, datatypes, chat_format, tokenizer = meta
    theirs = chat_format.ChatFormat(tokenizer.Tokenizer(Path(llama3_tokenizer)))
    call = {"call_id": "c1", "tool_name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": '{"temperature": 21}'},
              {"role": "assistant", "content": "21 degrees."},
              {"role": "user", "content": "And tomorrow?"}]
    raw = [datatypes.RawMessage(role=m["role"], content=m["content"] or "",
                                stop_reason=datatypes.StopReason.end_of_message if m.get("tool_calls") else None,
                                tool_calls=[datatypes.ToolCall(**c) for c in m.get("tool_calls", [])])
           for m in dialog]
    expected = theirs.encode_dialog_prompt(raw, datatypes.ToolPromptFormat.json).tokens
    assert ours.encode_dialog_prompt(dialog) == expected


@pytest.mark.parametrize("answer", [
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": "10",\n        "genre": "all"\n    }\n}',  # the document's model response
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<function=get_weather>{"city": "Paris"}</function>',
    '<|python_tag|>{"type": "function", "name": "f", "parameters": {}}',
    "The weather is fine.",
    '{"answer": 42}',
])
def test_answers_are_read_into_the_calls_llama_models_reads(meta, answer, llama3_tokenizer):
    _, datatypes, chat_format, tokenizer = meta
    reader = chat_format.ChatFormat(tokenizer.Tokenizer(Path(llama3_tokenizer)))
    theirs = reader.decode_assistant_message_from_content(answer + "<|eom_id|>", datatypes.StopReason.end_of_turn)
    mine = parse_tool_call(answer)
    if not theirs.tool_calls:
        assert mine is None
    else:
        assert (mine["tool_name"], mine["arguments"]) == (theirs.tool_calls[0].tool_name,
                                                          theirs.tool_calls[0].arguments)


def test_tool_choice_forces_the_start_of_a_call(ours):
    dialog = [{"role": "user", "content": "Songs?"}]
    named = {"type": "function", "function": {"name": "trending_songs"}}
    for choice in ("required", named):
        text = ours.tokenizer.decode(ours.encode_dialog_prompt(dialog, tools=[SONGS], tool_choice=choice))
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" + call_prefix(choice))
    assert parse_tool_call(call_prefix(named) + '{"n": 3}}') ["arguments"] == {"n": 3}
    # "none": the tools are not offered at all.
    plain = ours.encode_dialog_prompt(dialog)
    assert ours.encode_dialog_prompt(dialog, tools=[SONGS], tool_choice="none") == plain


def test_bad_tools_and_choices_and_other_formats_are_refused(ours, sp_tokenizer):
    for bad in ([], [{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}],
                [SONGS, SONGS], [{"type": "code_interpreter"}]):
        with pytest.raises(LlamaError):
            check_tools(bad)
    with pytest.raises(LlamaError, match="not among the tools"):
        check_tool_choice({"type": "function", "function": {"name": "other"}}, [SONGS])
    with pytest.raises(LlamaError, match="needs tools"):
        check_tool_choice("required", None)
    llama2 = make_chat_format(Tokenizer(sp_tokenizer))
    with pytest.raises(LlamaError, match="needs a Llama 3.1 model"):
        llama2.encode_dialog_prompt([{"role": "user", "content": "hi"}], tools=[SONGS])


def test_a_stream_holds_back_only_what_may_become_a_call():
    assert might_be_call("") and might_be_call("  <|pyth") and might_be_call('{"na') and might_be_call("<func")
    assert not might_be_call("The") and not might_be_call("<b>")


def test_chat_completion_calls_a_named_function_through_the_forced_start(family_ckpt):
    """A tiny Llama 3 model steered to write `{"city": "Rome"}}` after the forced start of a
    call of get_weather: chat_completion returns that call."""
    from helpers.steering import steer_model
    from llama import Llama

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    library = Llama.build(str(family_ckpt("llama3")), max_seq_len=512, max_batch_size=2, device="cpu", dtype="fp32")
    tokenizer = library.tokenizer
    dialog = [{"role": "user", "content": "Weather in Rome?"}]
    prompt = library.formatter.encode_dialog_prompt(dialog, [weather], named)
    chain = prompt[-1:] + tokenizer.encode('{"city": "Rome"}}', bos=False, eos=False)
    chain.append(tokenizer.special_tokens["<|eom_id|>"])
    assert len(set(chain)) == len(chain)
    steer_model(library.model, {a: {b: 30.0} for a, b in zip(chain, chain[1:])})
    [answer] = library.chat_completion([dialog], temperature=0, max_gen_len=16, tools=[weather], tool_choice=named)
    message = answer["generation"]
    assert message["content"] == "" and [(c["tool_name"], c["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Rome"})]
    with pytest.raises(LlamaError, match="not among the tools"):
        library.chat_completion([dialog], tools=[weather], tool_choice={"type": "function",
                                                                          "function": {"name": "other"}})
