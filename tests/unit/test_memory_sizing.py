"""The KV cache sized to the device (gpu_memory_fraction): as many rows as fit beside what is in
use and a forward pass's activations, checked with a faked torch.cuda.mem_get_info; and the
prefill passes kept within the activations a build leaves room for."""

import pytest
import torch

import llama.runtime.engine
import llama.runtime.memory
from llama import Llama, LlamaError, ModelArgs
from llama.runtime.memory import activation_bytes, kv_cache_bytes, kv_cache_rows, pass_tokens, rope_table_bytes
from llama.testing import TINY_PARAMS

GIB = 2**30
SEQ = 1024


def fake_gpu(monkeypatch, free: int, total: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def overhead(args: ModelArgs, rows: int) -> int:
    """What kv_cache_rows sets aside beside the memory in use: activations and the rotary table."""
    return activation_bytes(args, 1, pass_tokens(rows, SEQ)) + rope_table_bytes(args, SEQ)


@pytest.mark.parametrize("cap, expected", [(64, 3), (2, 2)])
def test_rows_are_what_the_fraction_leaves_up_to_max_batch_size(monkeypatch, cap, expected):
    args = ModelArgs.from_params(TINY_PARAMS)
    per_row = kv_cache_bytes(args, 1, SEQ, 1, torch.bfloat16)
    in_use = 3 * GIB  # the weights, another process
    # half the device: the memory in use, the overhead and three and a half rows
    total = 2 * (in_use + overhead(args, 64) + 3 * per_row + per_row // 2)
    fake_gpu(monkeypatch, total - in_use, total)
    cuda = torch.device("cuda")
    assert kv_cache_rows(args, 1, cuda, torch.bfloat16, cap, SEQ, 0.5) == expected
    # the same device with half of it in use: no row fits
    fake_gpu(monkeypatch, total // 2, total)
    with pytest.raises(LlamaError, match=r"gpu_memory_fraction=0.5 of cuda's \d+\.\d\d GiB leaves no room for one "
                                         r"KV cache row of max_seq_len=1024 .* \d+\.\d\d GiB is in use"):
        kv_cache_rows(args, 1, cuda, torch.bfloat16, cap, SEQ, 0.5)


def test_a_build_with_gpu_memory_fraction_takes_the_rows_that_fit(monkeypatch, tiny_ckpt, sp_tokenizer, capsys):
    args = ModelArgs.from_params(TINY_PARAMS)
    per_row = kv_cache_bytes(args, 1, SEQ, 1, torch.float32)
    total = 100 * GIB
    # half the machine: what is in use, the overhead and three and a quarter rows
    free = total - (total // 2 - overhead(args, 64) - 3 * per_row - per_row // 4)
    monkeypatch.setattr(llama.runtime.memory, "device_memory", lambda device: (free, total))
    generator = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=SEQ, max_batch_size=64, device="cpu",
                            dtype="fp32", gpu_memory_fraction=0.5)
    assert "KV cache: 3 rows (max_batch_size) x max_seq_len=1024" in capsys.readouterr().out
    assert generator.model.params.max_batch_size == 3 and len(generator.engine.rows) == 3
    assert generator.model.layers[0].attention.cache.k.shape[0] == 3
    prompts = ["One", "Two three", "Four five six", "Seven", "Eight nine"]
    got = generator.text_completion(prompts, temperature=0, max_gen_len=6)
    alone = [generator.text_completion([p], temperature=0, max_gen_len=6)[0] for p in prompts]
    assert got == alone


@pytest.mark.parametrize("fraction", [0, 1.5, "most", float("nan")])
def test_a_bad_gpu_memory_fraction_is_named(tiny_ckpt, sp_tokenizer, fraction):
    with pytest.raises(LlamaError, match="gpu_memory_fraction"):
        Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, device="cpu", gpu_memory_fraction=fraction)


def test_prefill_passes_stay_within_the_token_budget(monkeypatch, tiny_ckpt, sp_tokenizer):
    """Rows whose chunks would take a pass past PREFILL_TOKENS_PER_PASS (padding included) wait
    for the next step; the first row always goes; the results do not change."""
    generator = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=128, max_batch_size=4, device="cpu",
                            dtype="fp32", prefix_cache=False)
    prompts = ["A prompt of about ten tokens, give or take", "Another prompt, also some ten tokens long",
               "A third one, to fill a third row of the cache", "And a fourth for the last row of four"]
    expected = generator.text_completion(prompts, temperature=0, max_gen_len=4)
    passes = generator.engine.stats.prefill_passes
    assert passes == 1  # all four in one pass by default
    widths = []
    forward = llama.runtime.engine.Engine._forward

    def watched(self, tokens, *args, **kwargs):
        widths.append(tokens.numel())
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(llama.runtime.engine.Engine, "_forward", watched)
    monkeypatch.setattr(llama.runtime.engine, "PREFILL_TOKENS_PER_PASS", 24)
    generator.engine.prefill_chunk = 16
    assert generator.text_completion(prompts, temperature=0, max_gen_len=4) == expected
    prefills = generator.engine.stats.prefill_passes - passes
    assert prefills >= 2 and max(widths) <= 24
    # passes that score their prompts (echo) keep every token's logits: a smaller budget
    monkeypatch.setattr(llama.runtime.engine, "PREFILL_TOKENS_PER_PASS", 4096)
    monkeypatch.setattr(llama.runtime.engine, "SCORED_TOKENS_PER_PASS", 24)
    widths.clear()
    tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    scored = generator.generate(tokens, max_gen_len=2, temperature=0, logprobs=True, echo=True)
    assert max(widths) <= 24 and len(scored[0]) == 4
    widths.clear()
    generator.generate(tokens, max_gen_len=2, temperature=0)
    assert max(widths) > 24  # the same prompts unscored: one pass
