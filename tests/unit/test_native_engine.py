"""The native decode step inside the engine, through Meta's API (Llama.generate,
text_completion): LLAMA_NATIVE=1 forces it, LLAMA_NATIVE=0 forces the model's PyTorch
forward pass, and both must give the same results. Prefill always runs in PyTorch, so every
decode step reads cache rows PyTorch wrote; with more prompts than max_batch_size, rows
join (prefill) and leave (their budget ends) while other rows decode natively."""

import pytest
import torch

from llama import Llama, LlamaError, native
from llama.runtime import backend
from llama.utils.measurements import verdict_file

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels here (no compiler)")

SEQ = 32
# 7 prompts of 3..15 tokens into 3 rows; with max_gen_len 20 the longer ones run out of
# max_seq_len first, so rows leave at different steps and waiting prompts join mid-flight.
PROMPTS = [[1] + list(range(100 + 7 * i, 103 + 9 * i)) for i in range(7)]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Measured verdicts in a fresh cache (the library stays loaded from where it was built)."""
    native.available()
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("LLAMA_TUNE", "0")


@pytest.fixture
def native_calls(monkeypatch):
    """How many rows each native decode step computed, in order."""
    calls = []
    original = backend.NativeDecodeStep.__call__

    def spy(self, tokens, positions, rows):
        calls.append(len(tokens))
        return original(self, tokens, positions, rows)

    monkeypatch.setattr(backend.NativeDecodeStep, "__call__", spy)
    return calls


def _build(tiny_ckpt, sp_tokenizer, dtype="fp32", quantize=None):
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=SEQ, max_batch_size=3, device="cpu",
                       dtype=dtype, quantize=quantize)


def _both(llama, monkeypatch, native_calls, **kwargs):
    """generate() with the native decode step, then with PyTorch's, on the same Llama."""
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LLAMA_NATIVE", setting)
        native_calls.clear()
        results[setting] = llama.generate(PROMPTS, stop_tokens=[], **kwargs)
        assert bool(native_calls) == (setting == "1"), f"LLAMA_NATIVE={setting} decoded with the wrong backend"
    return results["1"], results["0"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_native_decode_gives_pytorch_results_through_generate(temperature, tiny_ckpt, sp_tokenizer, monkeypatch,
                                                              native_calls):
    llama = _build(tiny_ckpt, sp_tokenizer)
    (tokens, logprobs), (expected, expected_logprobs) = _both(
        llama, monkeypatch, native_calls, max_gen_len=20, temperature=temperature, logprobs=True, seed=7)
    lengths = [len(t) for t in expected]
    assert len(set(lengths)) > 2, "rows should leave at different steps"
    assert tokens == expected
    for got, want in zip(logprobs, expected_logprobs):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
    monkeypatch.setenv("LLAMA_NATIVE", "1")
    native_calls.clear()
    llama.generate(PROMPTS, max_gen_len=20, temperature=temperature, stop_tokens=[], seed=7)
    assert max(native_calls) == 3 and min(native_calls) < 3  # full batches and ragged ones


def test_text_completion_is_the_same_text_either_way(tiny_ckpt, sp_tokenizer, monkeypatch, native_calls):
    llama = _build(tiny_ckpt, sp_tokenizer)
    texts = ["Once upon a time", "The capital of France is", "Hello", "def f(x):", "x"]
    answers = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LLAMA_NATIVE", setting)
        answers[setting] = [c["generation"] for c in llama.text_completion(texts, temperature=0, max_gen_len=12)]
    assert answers["1"] == answers["0"] and native_calls


def _teacher_error(llama, monkeypatch, setting):
    """Greedy bf16 generation with LLAMA_NATIVE=setting; the largest gap between the logprobs
    its decode steps gave their tokens and PyTorch's teacher-forced ones (a prefill over
    prompt + tokens)."""
    monkeypatch.setenv("LLAMA_NATIVE", setting)
    tokens, logprobs = llama.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True, stop_tokens=[])
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    _, scored = llama.generate([p + t for p, t in zip(PROMPTS, tokens)], max_gen_len=1, temperature=0,
                               logprobs=True, echo=True, stop_tokens=[])
    return max(float((torch.tensor(got) - torch.tensor(teacher[len(p): len(p) + len(got)])).abs().max())
               for p, got, teacher in zip(PROMPTS, logprobs, scored))


def test_bf16_native_steps_score_their_tokens_as_pytorch_does(tiny_ckpt, sp_tokenizer, monkeypatch, native_calls):
    """bf16, the default dtype on this CPU: the native steps' logprobs of the tokens they chose
    are as close to PyTorch's teacher-forced ones as PyTorch's own decode steps are (bf16
    rounding differs between one-token steps and a prefill). Free-running greedy tokens agree
    only up to the first near-tie of this random model's flat logits (see README), so the
    scores are compared, not the token strings."""
    llama = _build(tiny_ckpt, sp_tokenizer, dtype="bf16")
    native_error = _teacher_error(llama, monkeypatch, "1")
    assert native_calls
    torch_error = _teacher_error(llama, monkeypatch, "0")
    assert native_error <= max(0.05, 2 * torch_error), (native_error, torch_error)


@pytest.mark.parametrize("layout", ["q8_0", "q4_0", "q4_1"])
def test_ggml_builds_decode_natively_through_generate(layout, tiny_ckpt, sp_tokenizer, monkeypatch, native_calls):
    """quantize="q8_0"/"q4_0"/"q4_1": decode steps in the fused native step without being
    told to (LLAMA_NATIVE unset, whatever a timing would say); the same greedy tokens as the model's own forward pass over
    the same blocks (PyTorch decode, LLAMA_NATIVE=0) in fp32."""
    llama = _build(tiny_ckpt, sp_tokenizer, quantize=layout)
    monkeypatch.delenv("LLAMA_NATIVE", raising=False)
    monkeypatch.setattr(backend, "_time_decode", lambda *args: {"torch": 1.0, "native": 2.0})  # not asked
    llama.generate(PROMPTS[:2], max_gen_len=4, temperature=0, stop_tokens=[])
    assert native_calls
    (tokens, _), (expected, _) = _both(llama, monkeypatch, native_calls, max_gen_len=20, temperature=0)
    assert tokens == expected


def test_the_backend_is_chosen_once_per_model(tiny_ckpt, sp_tokenizer, monkeypatch, native_calls):
    llama = _build(tiny_ckpt, sp_tokenizer)
    monkeypatch.delenv("LLAMA_NATIVE", raising=False)
    asked = []
    choose = backend.choose_decode_step
    monkeypatch.setattr(backend, "choose_decode_step", lambda *args: asked.append(args) or choose(*args))
    for _ in range(3):
        llama.generate(PROMPTS, max_gen_len=3, temperature=0, stop_tokens=[])
    assert len(asked) == 1
    llama.model.setup_caches(3, SEQ)  # new caches: the native step must not write the old ones
    llama.generate(PROMPTS[:1], max_gen_len=3, temperature=0, stop_tokens=[])
    assert len(asked) == 2


def test_the_measured_verdict_is_followed(tiny_ckpt, sp_tokenizer, monkeypatch, native_calls):
    """LLAMA_NATIVE unset: the engine decodes with whichever backend measured faster (faked
    here), and LLAMA_NATIVE=0 or 1 overrides it at any step."""
    monkeypatch.delenv("LLAMA_NATIVE", raising=False)
    for faster in backend.DECODE_BACKENDS:
        llama = _build(tiny_ckpt, sp_tokenizer)
        monkeypatch.setattr(backend, "_time_decode", lambda model, step, batch: {
            name: 1.0 if name == faster else 2.0 for name in backend.DECODE_BACKENDS})
        verdict_file("decode-backend").unlink(missing_ok=True)
        native_calls.clear()
        llama.generate(PROMPTS[:2], max_gen_len=3, temperature=0, stop_tokens=[])
        assert bool(native_calls) == (faster == "native")
        monkeypatch.setenv("LLAMA_NATIVE", "1" if faster == "torch" else "0")
        native_calls.clear()
        llama.generate(PROMPTS[:2], max_gen_len=3, temperature=0, stop_tokens=[])
        assert bool(native_calls) == (faster == "torch")
        monkeypatch.delenv("LLAMA_NATIVE", raising=False)


def test_a_bad_llama_native_value_is_named(tiny_ckpt, sp_tokenizer, monkeypatch):
    llama = _build(tiny_ckpt, sp_tokenizer)
    monkeypatch.setenv("LLAMA_NATIVE", "yes")
    with pytest.raises(LlamaError, match="LLAMA_NATIVE='yes'.*auto"):
        llama.generate(PROMPTS[:1], max_gen_len=2, temperature=0)
