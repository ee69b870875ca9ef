"""A Llama 3 model with Meta's real tiktoken tokenizer, end to end through chat_completion: its
weights are set (conftest.steer_model) so that after the prompt's closing "\n\n" it says
"Hello world" and then <|eot_id|>, which must end the answer and not appear in it. A random
tiny model cannot be relied on to emit <|eot_id|> at all."""

import pytest
import torch

from helpers.steering import steer_model
from llama import Llama

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet the world."}]


@pytest.fixture(scope="module")
def llama3(family_ckpt):
    state = torch.get_rng_state()
    gen = Llama.build(str(family_ckpt("llama3")), max_seq_len=64, max_batch_size=2, device="cpu", dtype="fp32")
    torch.set_rng_state(state)
    tok = gen.tokenizer
    newlines = tok.encode("\n\n", bos=False, eos=False)
    hello, world = tok.encode("Hello", bos=False, eos=False), tok.encode(" world", bos=False, eos=False)
    assert len(newlines) == len(hello) == len(world) == 1
    eot = tok.special_tokens["<|eot_id|>"]
    steer_model(gen.model, {newlines[0]: {hello[0]: 30.0}, hello[0]: {world[0]: 30.0}, world[0]: {eot: 30.0}})
    return gen, hello[0], world[0], eot


def test_the_prompt_is_meta_llama3_format(llama3):
    gen, *_ = llama3
    tok = gen.tokenizer
    ids = gen.formatter.encode_dialog_prompt(DIALOG)
    head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    text = f"<|begin_of_text|>{head('system')}Be brief.<|eot_id|>{head('user')}Greet the world.<|eot_id|>{head('assistant')}"
    assert ids == tok.encode(text, bos=False, eos=False, allow_special=True)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_chat_completion_stops_at_eot(llama3, temperature):
    gen, hello, world, eot = llama3
    [result] = gen.chat_completion([DIALOG], temperature=temperature, max_gen_len=20, logprobs=True)
    assert result["generation"] == {"role": "assistant", "content": "Hello world"}
    assert result["tokens"] == ["Hello", " world"]  # <|eot_id|> ended it and is not part of it
    assert len(result["logprobs"]) == 2 and all(lp > -1e-6 for lp in result["logprobs"])


def test_without_stop_tokens_the_model_really_emits_eot(llama3):
    """The steering works: asked to ignore stop tokens, the model writes <|eot_id|> third."""
    gen, hello, world, eot = llama3
    prompt = gen.formatter.encode_dialog_prompt(DIALOG)
    tokens, _ = gen.generate([prompt], max_gen_len=5, temperature=0, stop_tokens=[])
    assert tokens[0][:3] == [hello, world, eot] and len(tokens[0]) == 5
