"""The model flags every command shares (llama.cli.with_model_flags): one definition, each
command's own defaults, the flags handed over as ModelFlags, documented once in --help."""

import importlib.util
import inspect

import pytest

from helpers import REPO
from llama.cli import MODEL_FLAG_DOCS, MODEL_FLAGS, ModelFlags, with_model_flags


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def commands():
    from llama import batch, chat
    from llama.serve import __main__ as serve

    return {"chat": (chat.main, 2048, 1), "batch": (batch.main, 512, 4), "serve": (serve.main, 2048, 8),
            "example_chat_completion": (_example("example_chat_completion"), 512, 4),
            "example_text_completion": (_example("example_text_completion"), 128, 4)}


@pytest.mark.parametrize("name", ["chat", "batch", "serve", "example_chat_completion", "example_text_completion"])
def test_every_command_takes_the_model_flags_with_its_own_defaults(name):
    main, max_seq_len, max_batch_size = commands()[name]
    parameters = inspect.signature(main).parameters
    assert set(MODEL_FLAGS) <= set(parameters) and "model" not in parameters
    assert (parameters["max_seq_len"].default, parameters["max_batch_size"].default) == (max_seq_len, max_batch_size)
    assert all(parameters[f].default is None for f in ("ckpt_dir", "tokenizer_path", "dtype", "quantize"))
    for flag, doc in MODEL_FLAG_DOCS.items():  # documented once, in every command's --help
        assert f"{flag}: {doc}" in main.__doc__


def test_the_command_gets_its_flags_as_model_flags_and_its_own_as_they_are():
    seen = []

    @with_model_flags(max_seq_len=64, max_batch_size=2)
    def main(model: ModelFlags, prompt: str, temperature: float = 0.6):
        """A command.

        Args:
            prompt: what to say.
        """
        seen.append((model, prompt, temperature))

    main("hi", quantize="q8_0", temperature=0.0)
    main(prompt="yo", ckpt_dir="2024", max_seq_len=32)
    assert seen[0] == (ModelFlags(max_seq_len=64, max_batch_size=2, quantize="q8_0"), "hi", 0.0)
    assert seen[1] == (ModelFlags(ckpt_dir="2024", max_seq_len=32, max_batch_size=2), "yo", 0.6)
    assert list(inspect.signature(main).parameters)[:2] == ["prompt", "ckpt_dir"]  # required first
    assert "prompt: what to say." in main.__doc__ and "quantize: weight-only" in main.__doc__
    with pytest.raises(TypeError):
        main("hi", max_seq_len_typo=3)


def test_the_reuse_flags_reach_the_engine(tiny_ckpt, sp_tokenizer):
    """--noprefix_cache and --prompt_lookup_num_tokens (and the draft model's flags) arrive in
    the engine every command builds."""
    flags = ModelFlags(ckpt_dir=str(tiny_ckpt), tokenizer_path=sp_tokenizer, max_seq_len=32, max_batch_size=1,
                       prefix_cache=False, prompt_lookup_num_tokens=3, draft_ckpt_dir=str(tiny_ckpt),
                       num_assistant_tokens=2)
    engine = flags.build().engine
    assert (engine.prefix_cache, engine.prompt_lookup_num_tokens, engine.num_assistant_tokens) == (False, 3, 2)
    assert engine.draft_model is not None
    assert ModelFlags(ckpt_dir=str(tiny_ckpt), tokenizer_path=sp_tokenizer, max_seq_len=32,
                      max_batch_size=1).build().engine.prefix_cache
    import fire  # and as typed on a command line (a folder named 2024 stays a folder name)

    seen = []
    main = with_model_flags(max_seq_len=64, max_batch_size=2)(lambda model: seen.append(model))
    fire.Fire(main, command=["--noprefix_cache", "--prompt_lookup_num_tokens", "4", "--draft_ckpt_dir", "2024",
                             "--gpu_memory_fraction", "0.9"])
    assert (seen[0].prefix_cache, seen[0].prompt_lookup_num_tokens, seen[0].draft_ckpt_dir) == (False, 4, "2024")
    assert seen[0].gpu_memory_fraction == 0.9


def test_gpu_memory_fraction_reaches_the_build(tiny_ckpt, sp_tokenizer, capsys):
    flags = ModelFlags(ckpt_dir=str(tiny_ckpt), tokenizer_path=sp_tokenizer, max_seq_len=32, max_batch_size=3,
                       gpu_memory_fraction=0.99)
    assert len(flags.build().engine.rows) == 3  # this machine holds 3 rows of 32 tokens of the tiny model
    assert "KV cache: 3 rows (max_batch_size) x max_seq_len=32" in capsys.readouterr().out
