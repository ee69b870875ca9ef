"""Tool calling through the server with the real `openai` client: a tiny Llama 3 model (Meta's
real tokenizer) steered to answer with a call, driving an agent's two-turn tool loop, whole and
streamed, compared with the library's chat_completion on the same weights."""

import json
import shutil

import pytest

openai = pytest.importorskip("openai")

from helpers.serving import KEY, MODEL, start_server, stop_server  # noqa: E402
from helpers.steering import steer_model  # noqa: E402
from llama import Llama  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "its name"}},
                   "required": ["city"]}}}
CALL = '<function=get_weather>{"city": "Paris"}'  # a form llama-models reads; its tokens all differ


@pytest.fixture(scope="module")
def steered(family_ckpt, tmp_path_factory):
    """A Llama 3 checkpoint whose answer to any dialog is CALL, then <|eom_id|>; (its folder,
    the library on it)."""
    from llama.checkpoint.layout import save_checkpoint

    source = family_ckpt("llama3")
    library = Llama.build(str(source), max_seq_len=512, max_batch_size=2, device="cpu", dtype="fp32")
    tokenizer = library.tokenizer
    chain = tokenizer.encode("\n\n", bos=False, eos=False) + tokenizer.encode(CALL, bos=False, eos=False)
    chain.append(tokenizer.special_tokens["<|eom_id|>"])
    assert len(set(chain)) == len(chain)  # a bigram chain: each token says what follows it
    steer_model(library.model, {a: {b: 30.0} for a, b in zip(chain, chain[1:])})
    folder = tmp_path_factory.mktemp("llama3_tools")
    weights = {k: v.clone() for k, v in library.model.state_dict().items() if "cache" not in k}
    save_checkpoint(weights, json.loads((source / "params.json").read_text()), str(folder))
    shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    return folder, library


@pytest.fixture(scope="module")
def server(steered):
    folder, _ = steered
    proc, url = start_server(folder, str(folder / "tokenizer.model"), "--max_seq_len", "512")
    yield url
    rc, stderr = stop_server(proc)
    assert rc == 0, stderr[-3000:]


def test_an_agents_two_turn_tool_loop(server, steered):
    _, library = steered
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=32)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    expected = library.chat_completion([messages], temperature=0, max_gen_len=32, tools=[WEATHER])[0]["generation"]
    assert [(c["tool_name"], c["arguments"]) for c in expected["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    # The second turn: the call (content null) and its result go back, as agents send them.
    messages += [choice.message,  # the client's own object, as agents pass it back
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                            max_tokens=32)
    dialog = [messages[0], {"role": "assistant", "content": None, "tool_calls": [
        {"call_id": call.id, "tool_name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": '{"temperature": 21}'}]
    again = library.chat_completion([dialog], temperature=0, max_gen_len=32, tools=[WEATHER])[0]["generation"]
    assert second.choices[0].finish_reason == ("tool_calls" if again.get("tool_calls") else "stop")
    # Without tools offered, the same answer is plain text.
    plain = client.chat.completions.create(model=MODEL, messages=messages[:1], temperature=0, max_tokens=32)
    assert plain.choices[0].message.content == CALL and not plain.choices[0].message.tool_calls


def test_a_streamed_call_comes_as_a_tool_call_delta(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=32,
                                            stream=True)
    chunks = list(stream)
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == "" and len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_on_a_model_without_tool_calling_are_a_400(tiny_ckpt, sp_tokenizer):
    proc, url = start_server(tiny_ckpt, sp_tokenizer)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           tools=[WEATHER])
        assert exc.value.body["param"] == "tools" and "Llama 3.1" in exc.value.body["message"]
    finally:
        stop_server(proc)


def test_a_call_of_a_function_not_offered_is_text(server):
    """The steered answer calls get_weather; offered only another function, that is no call."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Time?"}],
                                            tools=[other], temperature=0, max_tokens=32)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content == CALL
