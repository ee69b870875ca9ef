"""Property-based and fuzz tests: generation over random prompts and sampling settings, and
the readers of untrusted files (params.json, checkpoint shards, GGUF) over mutated inputs,
which must either work or raise LlamaError: never another exception, never a hang.

Hypothesis runs derandomized (the same examples every run) so the suite stays reproducible."""

import contextlib
import json
import math
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from helpers.foreign import write_tiny_gguf, write_tiny_hf_dir
from llama import Llama, LlamaError, ModelArgs, Tokenizer
from llama.checkpoint import load_params, open_shard
from llama.convert import convert
from llama.testing import TINY_PARAMS

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_SEQ_LEN = 64  # as the `generator` fixture


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the tiny model is faster so, and much faster on a busy machine, where
    two threads spin against each other. (conftest restores the global RNG.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutations(size: int, new_bytes=st.integers(0, 255)):
    """A truncation, or 1-4 bytes overwritten (with values drawn from new_bytes), of a file of `size` bytes."""
    flips = st.lists(st.tuples(st.integers(0, size - 1), new_bytes), min_size=1, max_size=4)
    return st.one_of(st.integers(0, size - 1).map(lambda n: ("cut", n)), flips.map(lambda f: ("flip", f)))


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "cut":
        return data[:arg]
    out = bytearray(data)
    for pos, byte in arg:
        out[pos] = byte
    return bytes(out)


# ---- generation -----------------------------------------------------------------------------

@settings(max_examples=25, **SETTINGS)
@given(prompts=st.lists(st.text(max_size=50), min_size=1, max_size=6),  # max_batch_size is 4
       temperature=st.one_of(st.just(0.0), st.floats(0.05, 2.0)),
       top_p=st.floats(0.01, 1.0),
       max_gen_len=st.integers(1, 10),
       stop_picks=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9)), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_generation_never_crashes_and_respects_budget_and_stop_tokens(
        generator, prompts, temperature, top_p, max_gen_len, stop_picks, seed):
    tok = generator.tokenizer
    ids = [tok.encode(p, bos=True, eos=False) for p in prompts]
    if any(len(t) >= MAX_SEQ_LEN for t in ids):
        event("a prompt is too long")
        with pytest.raises(LlamaError, match="too many for max_seq_len"):
            generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        return

    # Without stop tokens ([-1] never occurs) every row runs its whole budget.
    torch.manual_seed(seed)
    free, logprobs = generator.generate(ids, max_gen_len, temperature, top_p, logprobs=True, stop_tokens=[-1])
    for prompt, out, lps in zip(ids, free, logprobs, strict=True):
        assert len(out) == len(lps) == min(max_gen_len, MAX_SEQ_LEN - len(prompt))
        assert all(0 <= t < tok.n_words for t in out)
        assert all(lp <= 1e-6 and not math.isnan(lp) for lp in lps)

    # With stop tokens taken from those outputs, the same draws end at the first stop token,
    # which is not returned. (When sampling, only the first chunk of max_batch_size prompts
    # sees the same draws: a chunk that stops early leaves the RNG elsewhere for the next.)
    stops = {free[r % len(free)][i % len(free[r % len(free)])] for r, i in stop_picks if free[r % len(free)]}
    if stops:
        torch.manual_seed(seed)
        stopped, _ = generator.generate(ids, max_gen_len, temperature, top_p, stop_tokens=sorted(stops))
        same_draws = len(ids) if temperature == 0 else generator.model.params.max_batch_size
        for out, cut in zip(free[:same_draws], stopped, strict=False):
            first_stop = next((i for i, t in enumerate(out) if t in stops), len(out))
            assert cut == out[:first_stop]
            event("stopped early" if first_stop < len(out) else "ran its whole budget")
        assert len(stopped) == len(ids) and not any(t in stops for out in stopped for t in out)

    # text_completion is generate() decoded: the same draws (same seed, default stop tokens).
    torch.manual_seed(seed)
    texts = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    torch.manual_seed(seed)
    tokens, _ = generator.generate(ids, max_gen_len, temperature, top_p)
    assert [t["generation"] for t in texts] == [tok.decode(out) for out in tokens]


# ---- params.json ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def params_text() -> bytes:
    return (json.dumps(TINY_PARAMS, indent=2) + "\n").encode()


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
@pytest.mark.slow
def test_mutated_params_json_builds_or_raises_llama_error(data, tiny_ckpt, sp_tokenizer, params_text):
    # Mostly bytes that keep the JSON valid but change numbers, so that many reach the model.
    mutation = data.draw(mutations(len(params_text), st.sampled_from(b"0123456789-.e ") | st.integers(0, 255)))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        (ckpt / "consolidated.00.pth").symlink_to(tiny_ckpt / "consolidated.00.pth")
        (ckpt / "params.json").write_bytes(mutate(params_text, mutation))
        with time_limit(30):
            try:
                Llama.build(str(ckpt), sp_tokenizer, max_seq_len=16, max_batch_size=1, device="cpu", dtype="fp32")
                event("built")
            except LlamaError:
                event("LlamaError")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5)
PARAMS_KEYS = sorted(TINY_PARAMS) + ["n_kv_heads", "ffn_dim_multiplier", "use_scaled_rope",
                                      "rope_scaling_factor", "chat_format", "default_system_prompt"]


@settings(max_examples=150, **SETTINGS)
@given(changes=st.dictionaries(st.sampled_from(PARAMS_KEYS), JSON_VALUES, min_size=1, max_size=3))
@example(changes={"dim": True})
@example(changes={"rope_theta": float("nan")})
@example(changes={"norm_eps": 10**400})
def test_params_json_with_odd_values_is_accepted_only_if_usable(changes):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.json").write_text(json.dumps({**TINY_PARAMS, **changes}))
        try:
            params = load_params(tmp)
        except LlamaError:
            return
    # Accepted: the model's settings follow from it without surprises.
    args = ModelArgs.from_params(params)
    assert args.head_dim * args.n_heads == args.dim and args.head_dim % 2 == 0
    assert args.n_heads % args.kv_heads == 0 and args.n_layers >= 1
    assert args.ffn_hidden_dim >= 0 and args.norm_eps > 0 and args.rope_theta > 0


# ---- checkpoint shards ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_shard() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "consolidated.00.pth"
        torch.save({"norm.weight": torch.ones(8), "output.weight": torch.randn(4, 8)}, path)
        return path.read_bytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about some of the odd pickles
@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mutated_shard_loads_or_raises_llama_error(data, small_shard):
    mutation = data.draw(mutations(len(small_shard)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "consolidated.00.pth"
        path.write_bytes(mutate(small_shard, mutation))
        with time_limit(10):
            try:
                state = open_shard(path)
            except LlamaError as exc:
                assert "consolidated.00.pth" in str(exc)
                return
            assert all(isinstance(v, torch.Tensor) for v in state.values())


# ---- GGUF ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def test_tiny_gguf_converts_and_runs(tiny_gguf, tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf)
    dst = convert(str(tmp_path / "tiny.gguf"), str(tmp_path / "out"), dtype="fp32")
    gen = Llama.build(str(dst), max_seq_len=16, max_batch_size=1, device="cpu", dtype="fp32")
    dialog = [{"role": "user", "content": "abc"}]
    answer = gen.chat_completion([dialog], temperature=0, max_gen_len=3)
    prompt = gen.formatter.encode_dialog_prompt(dialog)
    assert prompt[0] == 6  # <|im_start|>
    tokens, _ = gen.generate([prompt], 3, temperature=0, stop_tokens=gen.formatter.stop_tokens)
    assert answer[0]["generation"] == {"role": "assistant", "content": gen.tokenizer.decode(tokens[0])}


def _convert_or_llama_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.gguf"
        src.write_bytes(data)
        with time_limit(10):
            try:
                convert(str(src), str(Path(tmp) / "out"), dtype="fp32")
            except LlamaError as exc:
                assert "model.gguf" in str(exc)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mutated_gguf_converts_or_raises_llama_error(data, tiny_gguf):
    # Half of the mutations hit the first 1200 bytes, where the metadata and tensor index are.
    size = data.draw(st.sampled_from([len(tiny_gguf), 1200]))
    _convert_or_llama_error(mutate(tiny_gguf, data.draw(mutations(size))))


def _set_after_key(data: bytes, key: str, skip: int, value: bytes) -> bytes:
    """Overwrite the bytes `skip` bytes after metadata key `key` with `value`."""
    at = data.index(key.encode()) + len(key) + skip
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize("key", ["tokenizer.ggml.token_type", "tokenizer.ggml.tokens"])
def test_gguf_with_huge_array_length_is_refused_at_once(key, tiny_gguf):
    """An array claiming 2^40 entries: the stock gguf reader would loop for hours past the end."""
    _convert_or_llama_error(_set_after_key(tiny_gguf, key, 8, (2**40).to_bytes(8, "little")))


def test_gguf_with_huge_block_count_is_refused_at_once(tiny_gguf):
    """n_layers = 4 billion (a flipped high byte): refused without allocating anything for them."""
    data = _set_after_key(tiny_gguf, "llama.block_count", 4, (0xFFFFFFF0).to_bytes(4, "little"))
    with pytest.raises(LlamaError, match="llama.block_count = 4294967280 is invalid, it must be an integer from 1 to"):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.gguf").write_bytes(data)
            with time_limit(10):
                convert(str(Path(tmp) / "model.gguf"), str(Path(tmp) / "out"), dtype="fp32")


# ---- HF directories: config.json, tokenizer_config.json, safetensors headers --------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return write_tiny_hf_dir(tmp_path_factory.mktemp("hf") / "model")


@contextlib.contextmanager
def hf_copy(tiny_hf: Path, name: str, data: bytes):
    """A copy of the tiny HF directory with file `name` holding `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        shutil.copytree(tiny_hf, src)
        (src / name).write_bytes(data)
        yield src


def _converts_or_names_the_folder(src: Path) -> None:
    """Converting `src` works or raises a LlamaError naming a file in it (or the folder itself,
    for weights that do not fit its settings): never another exception, never a hang."""
    with time_limit(10):
        try:
            convert(str(src), str(src.parent / "out"), dtype="fp32")
            event("converted")
        except LlamaError as exc:
            assert str(src) in str(exc), str(exc)
            event("LlamaError")


def _json_changes(keys):
    return st.dictionaries(st.sampled_from(keys), JSON_VALUES | st.just(...), min_size=1, max_size=3)


def _changed(text: bytes, changes: dict) -> bytes:
    """The JSON object `text` with `changes` applied (a value of ... removes the key)."""
    data = {**json.loads(text), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


HF_CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "rope_parameters", "tie_word_embeddings", "model_type"]


@settings(max_examples=150, **SETTINGS)
@given(changes=_json_changes(HF_CONFIG_KEYS))
@example(changes={"rope_scaling": {"rope_type": "llama3", "factor": []}})
@example(changes={"num_key_value_heads": 4, "num_attention_heads": 4})
def test_config_json_with_odd_values_converts_or_names_the_file(changes, tiny_hf):
    with hf_copy(tiny_hf, "config.json", _changed((tiny_hf / "config.json").read_bytes(), changes)) as src:
        _converts_or_names_the_folder(src)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_mutated_config_json_bytes_convert_or_name_the_file(data, tiny_hf):
    text = (tiny_hf / "config.json").read_bytes()
    mutation = data.draw(mutations(len(text), st.sampled_from(b'0123456789-.e ,:[]{}"') | st.integers(0, 255)))
    with hf_copy(tiny_hf, "config.json", mutate(text, mutation)) as src:
        _converts_or_names_the_folder(src)


TOKEN_CONFIG_KEYS = ["bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template"]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_mutated_token_configs_convert_and_load_or_name_the_file(name, data, tiny_hf):
    text = (tiny_hf / "tokenizer_config.json").read_bytes()
    if data.draw(st.booleans()):
        new = _changed(text, data.draw(_json_changes(TOKEN_CONFIG_KEYS)))
    else:
        new = mutate(text, data.draw(mutations(len(text), st.sampled_from(b'"{}[],:01tfn<|>') | st.integers(0, 255))))
    with hf_copy(tiny_hf, name, new) as src:
        _converts_or_names_the_folder(src)
        try:
            Tokenizer(str(src / "tokenizer.json"))
            event("tokenizer loaded")
        except LlamaError as exc:
            assert str(src) in str(exc), str(exc)
            event("LlamaError")


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F33", ""]


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_safetensors_with_lying_headers_convert_or_name_the_file(data, tiny_hf):
    raw = (tiny_hf / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    if data.draw(st.booleans()):  # lie about one tensor's dtype, shape or offsets, keeping the JSON valid
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = dict(header[name])
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[key] = data.draw({"dtype": st.sampled_from(SAFETENSORS_DTYPES),
                                "shape": st.lists(st.integers(0, 2**40) | st.integers(0, 64), max_size=3),
                                "data_offsets": st.lists(st.integers(0, len(body) + 64) | st.integers(0, 2**64 - 1),
                                                         min_size=2, max_size=2)}[key])
        text = json.dumps({**header, name: entry}).encode()
        new = len(text).to_bytes(8, "little") + text + body
    else:  # damage the header's bytes, its length prefix included
        new = mutate(raw, data.draw(mutations(8 + size)))
    with hf_copy(tiny_hf, "model.safetensors", new) as src:
        _converts_or_names_the_folder(src)
