"""A prompt's attention in the model's dtype where that is measured faster than in the KV
cache's fp32 (llama.runtime.backend.prompt_attention_dtype, on the CPU): the choice follows the timing
with a margin, is kept per machine so that every process makes the same one, is asked once per
model and caches, applies to prompts over their own keys only (decode steps and later prompt
chunks keep the cache's dtype), and moves the prompt's logits only within bf16 rounding."""

import os

import pytest
import torch
import torch.nn.functional as F

from helpers.processes import choices_of_processes_starting_together
from llama import Llama
from llama.runtime import backend

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello", "Once upon a time, in a land far away"]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Verdicts in a fresh cache, so that each test measures (or fakes) its own; the native
    kernel's timing faked as unavailable unless a test says otherwise."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(backend, "time_native_prompt_attention", lambda *shape: None)


def _build(tiny_ckpt, sp_tokenizer, dtype: str) -> Llama:
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu", dtype=dtype)


def _use(model, dtype) -> None:
    for layer in model.layers:
        layer.attention.prompt_attention_dtype = dtype


@pytest.mark.parametrize("bf16_seconds, chosen", [(0.5, torch.bfloat16), (0.9, None), (1.5, None)])
def test_the_models_dtype_is_chosen_only_where_clearly_faster(bf16_seconds, chosen, tiny_ckpt, sp_tokenizer,
                                                                monkeypatch):
    model = _build(tiny_ckpt, sp_tokenizer, "bf16").model
    timed = []

    def timing(dtype, heads, kv_heads, head_dim):
        timed.append((dtype, heads, kv_heads, head_dim))
        return bf16_seconds if dtype == torch.bfloat16 else 1.0

    monkeypatch.setattr(backend, "time_prompt_attention", timing)
    assert backend.prompt_attention_dtype(model) == chosen
    a = model.layers[0].attention
    assert {d for d, *_ in timed} == {torch.bfloat16, torch.float32}
    assert {tuple(shape) for _, *shape in timed} == {(a.n_local_heads, a.n_local_kv_heads, a.head_dim)}


@pytest.mark.parametrize("native_seconds, native", [(0.3, True), (0.45, False), (None, False)])
def test_the_native_kernel_is_chosen_only_where_clearly_faster(native_seconds, native, tiny_ckpt, sp_tokenizer,
                                                               monkeypatch):
    """Against PyTorch's best (bf16 at 0.5 s here), with the same margin; None: it cannot run."""
    model = _build(tiny_ckpt, sp_tokenizer, "bf16").model
    monkeypatch.setattr(backend, "time_prompt_attention", lambda dtype, *shape: 0.5 if dtype == torch.bfloat16 else 1.0)
    monkeypatch.setattr(backend, "time_native_prompt_attention", lambda *shape: native_seconds)
    assert backend.prompt_attention_native(model) is native
    assert backend.prompt_attention_dtype(model) == torch.bfloat16


def test_the_verdict_is_kept_for_every_process_on_the_machine(tiny_ckpt, sp_tokenizer, monkeypatch):
    """Measured once: a second model (as a server beside a script would build) gets the kept
    verdict untimed, even where a new timing would now say otherwise; other threads re-time."""
    model = _build(tiny_ckpt, sp_tokenizer, "bf16").model
    timed = []
    monkeypatch.setattr(backend, "time_prompt_attention",
                        lambda dtype, *shape: timed.append(dtype) or (0.5 if dtype == torch.bfloat16 else 1.0))
    assert backend.prompt_attention_dtype(model) == torch.bfloat16 and len(timed) == 2
    monkeypatch.setattr(backend, "time_prompt_attention", lambda dtype, *shape: timed.append(dtype) or 1.0)
    assert backend.prompt_attention_dtype(_build(tiny_ckpt, sp_tokenizer, "bf16").model) == torch.bfloat16
    assert len(timed) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert backend.prompt_attention_dtype(model) is None and len(timed) == 4


def test_nothing_is_timed_where_the_cache_has_the_models_dtype(tiny_ckpt, sp_tokenizer, monkeypatch):
    model = _build(tiny_ckpt, sp_tokenizer, "fp32").model
    monkeypatch.setattr(backend, "time_prompt_attention", lambda *args: pytest.fail("timed"))
    assert backend.prompt_attention_dtype(model) is None


def test_real_timing_gives_a_choice(tiny_ckpt, sp_tokenizer):
    assert backend.prompt_attention_dtype(_build(tiny_ckpt, sp_tokenizer, "bf16").model) in (None, torch.bfloat16)


def test_the_engine_asks_once_per_model_and_caches(tiny_ckpt, sp_tokenizer, monkeypatch):
    gen = _build(tiny_ckpt, sp_tokenizer, "bf16")
    asked = []
    monkeypatch.setattr(backend, "prompt_attention_dtype", lambda model: asked.append(model) or torch.bfloat16)
    monkeypatch.setattr(backend, "prompt_attention_native", lambda model: False)
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in PROMPTS]
    gen.generate(prompts, 3, temperature=0)
    gen.generate(prompts[:1], 3, temperature=0)
    assert len(asked) == 1
    assert all(layer.attention.prompt_attention_dtype == torch.bfloat16 for layer in gen.model.layers)
    gen.model.setup_caches(4, 64)  # new caches: asked again
    gen.generate(prompts, 3, temperature=0)
    assert len(asked) == 2


def test_only_a_prompt_over_its_own_keys_runs_in_the_chosen_dtype(tiny_ckpt, sp_tokenizer, monkeypatch):
    """Spied attention calls: the first prompt chunk in bf16, later chunks (which read the
    cache) and decode steps in the cache's fp32."""
    monkeypatch.setenv("LLAMA_NATIVE", "0")  # the model's own decode steps, so the spy sees them
    gen = _build(tiny_ckpt, sp_tokenizer, "bf16")
    gen.engine.prefill_chunk = 4
    monkeypatch.setattr(backend, "prompt_attention_dtype", lambda model: torch.bfloat16)
    monkeypatch.setattr(backend, "prompt_attention_native", lambda model: False)
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], q.dtype, k.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    prompt = gen.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    assert len(prompt) > 4
    gen.generate([prompt], 3, temperature=0)
    first, later = calls[0], calls[len(gen.model.layers)]
    assert first[:2] == (4, 4) and first[2:] == (torch.bfloat16, torch.bfloat16), first
    assert later[0] > 1 and later[1] > later[0] and later[2:] == (torch.float32, torch.float32), later
    decode = [c for c in calls if c[0] == 1]
    assert decode and all(c[2:] == (torch.float32, torch.float32) for c in decode)
    assert all(layer.attention.cache.k.dtype == torch.float32 for layer in gen.model.layers)


def test_bf16_prompt_attention_keeps_the_bf16_build_within_its_bounds_of_fp32(tiny_ckpt, sp_tokenizer):
    """Against the fp32 build, the bf16 build's prompt logprobs with bf16 prompt attention stay
    within the bounds tests/test_default_dtype.py holds the bf16 build to (total variation
    0.06, |logprob diff| 0.6), as with fp32 prompt attention, and differ from those."""
    reference, gen = _build(tiny_ckpt, sp_tokenizer, "fp32"), _build(tiny_ckpt, sp_tokenizer, "bf16")
    worst = {None: [0.0, 0.0], torch.bfloat16: [0.0, 0.0]}
    moved = 0.0
    for text in PROMPTS:
        tokens = torch.tensor([gen.tokenizer.encode(text, bos=True, eos=False)])
        with torch.inference_mode():
            high = torch.log_softmax(reference.model(tokens, 0)[0], -1)
            lows = {}
            for dtype in worst:
                _use(gen.model, dtype)
                lows[dtype] = low = torch.log_softmax(gen.model(tokens, 0)[0].float(), -1)
                tv = (low.exp() - high.exp()).abs().sum(-1).max().item() / 2
                worst[dtype] = [max(worst[dtype][0], tv), max(worst[dtype][1], (low - high).abs().max().item())]
            moved = max(moved, (lows[None] - lows[torch.bfloat16]).abs().max().item())
    print(f"bf16 build vs fp32, (total variation, |logprob diff|): fp32 prompt attention {worst[None]}, "
          f"bf16 prompt attention {worst[torch.bfloat16]}")
    for tv, lp in worst.values():
        assert tv < 0.06 and lp < 0.6
    assert moved > 0  # really another computation


def _measure_in_a_process(ckpt: str, tokenizer: str, cache: str, bf16_faster: bool, both_timing, out) -> None:
    """A process whose own timing favours bf16 or not. Its timing waits (up to 3 s) for the
    other process to be timing too: so both time at once unless one waits for the other's verdict."""
    import threading

    os.environ["LLAMA_CACHE"] = cache
    model = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=4, device="cpu", dtype="bf16").model

    def timing(dtype, *shape):
        try:
            both_timing.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return (0.5 if bf16_faster else 1.5) if dtype == torch.bfloat16 else 1.0

    backend.time_prompt_attention = timing
    out.put(str(backend.prompt_attention_dtype(model)))


@pytest.mark.subprocess
def test_processes_measuring_at_once_choose_alike(tiny_ckpt, sp_tokenizer, tmp_path):
    """Two processes (the ranks of a job) whose own timings disagree, starting together: one
    measures, the other waits for its verdict, and both choose the same."""
    choices = choices_of_processes_starting_together(
        _measure_in_a_process, [(str(tiny_ckpt), sp_tokenizer, str(tmp_path), faster) for faster in (True, False)])
    assert choices[0] == choices[1], choices
