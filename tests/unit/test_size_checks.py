"""Checks before allocation: params.json against the shards' own shapes, the build against
the memory there is, and the inputs that would otherwise hang or crash deep inside torch
(FIFO shards, non-float weights, a device this machine lacks, a non-float dtype, an
unbounded timeout). Each is a LlamaError with the numbers, raised before any weight or cache
is allocated."""

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

import llama.model
import llama.model.cache
import llama.runtime.memory
from llama import Llama, LlamaError, ModelArgs
from llama.runtime.memory import activation_bytes, check_memory, kv_cache_bytes, pass_tokens, rank_weight_bytes
from llama.testing import TINY_PARAMS, random_meta_weights

FAST_S = 10  # every refusal here comes long before this


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, copy)
    return copy


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail the test if the build gets as far as making the model or its caches."""
    def built(*args, **kwargs):
        raise AssertionError("the build allocated before refusing")

    monkeypatch.setattr(llama.model.Transformer, "__init__", built)
    monkeypatch.setattr(llama.model.cache.KVCache, "__init__", built)


def _build(ckpt, tokenizer, **kwargs) -> Llama:
    kwargs = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", "dtype": "fp32", **kwargs}
    return Llama.build(str(ckpt), tokenizer, **kwargs)


def _refused(ckpt, tokenizer, message, **kwargs) -> str:
    """The build's LlamaError matching `message`, raised within FAST_S seconds (an alarm
    ends a build that blocks, e.g. reading a FIFO, instead of hanging the suite)."""
    def expired(*_):
        raise TimeoutError(f"the build was still running after {FAST_S}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(FAST_S)
    try:
        with pytest.raises(LlamaError, match=message) as info:
            _build(ckpt, tokenizer, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return str(info.value)


# ---- params.json against the shards ------------------------------------------------------

HUGE = {
    "n_layers": (1000000, r"does not fit params\.json: missing weights \['layers\.2\.attention\.wq\.weight'.*"
                          r"consolidated\.00\.pth holds 2 layers, params\.json says n_layers=1000000"),
    "dim": (2**62, r"weight 'tok_embeddings\.weight' in '.*ckpt' has shape \(32000, 64\) in consolidated\.00\.pth, "
                   r"which does not fit params\.json \(expected \(32000, 4611686018427387904\)\)"),
    "ffn_dim_multiplier": (1e300, r"weight 'layers\.0\.feed_forward\.w1\.weight' .* has shape \(192, 64\) .* "
                                  r"does not fit params\.json \(expected \(\d{250,}, 64\)\)"),
    "vocab_size": (10**12, r"tokenizer .* has 32000 tokens but the model .* has vocab_size 1000000000000"),
}


@pytest.mark.parametrize("key", HUGE)
def test_absurd_params_are_refused_before_building(key, ckpt, sp_tokenizer, nothing_allocated):
    value, message = HUGE[key]
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, key: value}))
    _refused(ckpt, sp_tokenizer, message)


def test_a_vocabulary_taken_from_the_tokenizer_is_checked_too(ckpt, sp_tokenizer, nothing_allocated):
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "vocab_size": -1, "n_kv_heads": 1}))
    _refused(ckpt, sp_tokenizer, r"weight 'layers\.0\.attention\.wk\.weight' .* has shape \(32, 64\) .* "
                                 r"\(expected \(16, 64\)\)")


# ---- memory -------------------------------------------------------------------------------

def _message_numbers(message: str) -> dict:
    return {k: int(v) for k, v in re.findall(r"(max_batch_size|max_seq_len)=(\d+)", message)}


def test_a_kv_cache_larger_than_memory_is_refused_with_numbers(ckpt, sp_tokenizer, nothing_allocated):
    args = ModelArgs.from_params(TINY_PARAMS)
    available = llama.runtime.memory.available_memory(torch.device("cpu"))
    per_sequence = kv_cache_bytes(args, 1, 4096, 1, torch.float32)
    batch = int(1.5 * available / per_sequence) + 1  # half as much again as there is
    message = _refused(ckpt, sp_tokenizer, "not enough memory on cpu for this build", max_seq_len=4096,
                       max_batch_size=batch)
    assert f"max_batch_size={batch} x max_seq_len=4096" in message
    assert re.search(r"the weights \(torch\.float32, this rank's share\) take 0\.02 GiB and the KV cache "
                     r"for .* \d+\.\d\d GiB, together \d+\.\d\d GiB, but \d+\.\d\d GiB is available", message)
    assert re.search(r"at most about \d+ cached tokens fit", message), message


def test_absurd_context_is_refused(ckpt, sp_tokenizer, nothing_allocated):
    _refused(ckpt, sp_tokenizer, r"not enough memory on cpu .* max_seq_len=1099511627776", max_seq_len=2**40)


def test_what_the_refusal_suggests_fits(monkeypatch):
    """With 1 MiB of room beside the weights and a forward pass's activations (0.25 MiB of it
    for the rotary table at max_seq_len 4096, 512 bytes per cached token), the suggested sizes
    pass the same check."""
    args = ModelArgs.from_params({**TINY_PARAMS, "vocab_size": 32000})
    weights = rank_weight_bytes(args, 1, torch.float32)
    activations = activation_bytes(args, 1, pass_tokens(8, 4096))  # the largest of the three
    monkeypatch.setattr(llama.runtime.memory, "available_memory", lambda device: weights + activations + 2**20)
    cpu = torch.device("cpu")
    with pytest.raises(LlamaError, match="at most about 1536 cached tokens fit") as info:
        check_memory(args, 1, cpu, torch.float32, 8, 4096)
    suggested = str(info.value).split("fit")[1]
    seq_then_batch = re.findall(r"max_seq_len=(\d+) with max_batch_size=(\d+)", suggested)
    batch_then_seq = re.findall(r"max_batch_size=(\d+) with max_seq_len=(\d+)", suggested)
    assert seq_then_batch == [("192", "8")] and batch_then_seq == [("1", "1536")], suggested
    check_memory(args, 1, cpu, torch.float32, 8, 192)
    check_memory(args, 1, cpu, torch.float32, 1, 1536)
    monkeypatch.setattr(llama.runtime.memory, "available_memory", lambda device: weights // 2)
    with pytest.raises(LlamaError, match="the weights and a forward pass leave no room"):
        check_memory(args, 1, cpu, torch.float32, 1, 16)


def test_weight_bytes_match_the_loaded_model(generator):
    """The estimate is the model's own size (fp32 here; tiny is untied, no rounding)."""
    params = {**TINY_PARAMS}
    args = ModelArgs.from_params(params)
    loaded = sum(p.numel() * p.element_size() for p in generator.model.parameters())
    assert rank_weight_bytes(args, 1, torch.float32) == loaded
    caches = sum(b.numel() * b.element_size() for b in generator.model.buffers())
    expected = kv_cache_bytes(args, 4, 64, 1, torch.float32) + llama.runtime.memory.rope_table_bytes(args, 64)
    assert caches == expected


# ---- files that are not files, weights that are not floats ---------------------------------

@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_refused_not_waited_on(kind, ckpt, sp_tokenizer):
    shard = ckpt / "consolidated.00.pth"
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        shard.symlink_to("/dev/zero")  # reading it would never end
    else:
        shard.mkdir()
    _refused(ckpt, sp_tokenizer, r"'.*consolidated\.00\.pth' is not a regular file \(a directory, FIFO or device\)")


def test_a_params_json_that_is_a_fifo_is_refused(ckpt, sp_tokenizer):
    (ckpt / "params.json").unlink()
    os.mkfifo(ckpt / "params.json")
    _refused(ckpt, sp_tokenizer, r"params\.json' is not a regular file")


NOT_FLOAT = {
    "int32": lambda w: w.to(torch.int32),
    "bool": lambda w: w > 0,
    "sparse": lambda w: w.to_sparse(),
    "quantized": lambda w: torch.quantize_per_tensor(w, 0.01, 0, torch.qint8),
}


@pytest.mark.filterwarnings("ignore:.*(quantize_per_tensor|TypedStorage).*:UserWarning")
@pytest.mark.parametrize("kind", NOT_FLOAT)
def test_weights_that_are_not_dense_floats_are_refused(kind, tmp_path, sp_tokenizer, nothing_allocated):
    weights = random_meta_weights(TINY_PARAMS)
    weights["layers.1.attention.wv.weight"] = NOT_FLOAT[kind](weights["layers.1.attention.wv.weight"])
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    torch.save(weights, tmp_path / "consolidated.00.pth")
    what = {"int32": r"torch\.int32", "bool": r"torch\.bool", "sparse": r"torch\.sparse_coo",
            "quantized": r"torch\.qint8"}[kind]
    _refused(tmp_path, sp_tokenizer, rf"weight 'layers\.1\.attention\.wv\.weight' in '.*consolidated\.00\.pth' "
                                     rf"is a {what} tensor; checkpoint weights must be dense floating-point")


# ---- arguments and environment --------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda(tiny_ckpt, sp_tokenizer):
    _refused(tiny_ckpt, sp_tokenizer, r"device='cuda': this machine \(or this build of torch\) has no cuda "
                                      r"device; use device='cpu'", device="cuda")


def test_device_index_beyond_the_devices_there_are(monkeypatch, tiny_ckpt, sp_tokenizer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _refused(tiny_ckpt, sp_tokenizer, r"device='cuda:3': there is no cuda device 3 here \(this machine has 2\)",
             device="cuda:3")


def test_a_device_name_that_is_not_one(tiny_ckpt, sp_tokenizer):
    _refused(tiny_ckpt, sp_tokenizer, r"device='gpu' is not a device", device="gpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float64, "int8", ["bf16"]])
def test_dtypes_other_than_fp32_bf16_fp16_are_refused(dtype, tiny_ckpt, sp_tokenizer):
    _refused(tiny_ckpt, sp_tokenizer, rf"dtype={re.escape(repr(dtype))} \(or LLAMA_DTYPE\) is not supported; "
                                      r"use one of fp32, bf16, fp16", dtype=dtype)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e30", "0", "-5"])
def test_unbounded_or_empty_dist_timeouts_are_refused(value, monkeypatch):
    from llama.runtime.distributed import timeout_s

    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", value)
    with pytest.raises(LlamaError, match=rf"LLAMA_DIST_TIMEOUT='{value}' must be a positive number of seconds, "
                                         r"at most 604800 \(a week\)"):
        timeout_s()
