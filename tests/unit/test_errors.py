"""User mistakes and damaged files through the Python API, and through the example scripts:
each is a LlamaError naming the file, argument or value and saying what to do; the scripts
print it as one line on stderr and exit 1, without a traceback.

(Sampling arguments, prompts, dialogs and chunking are covered in test_generation.py,
pickled code in test_convert.py, tokenizer files in test_tokenizer.py.)"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama.model.cache
from helpers import REPO
from llama import Llama, LlamaError, ModelArgs
from llama.runtime.memory import kv_cache_bytes
from llama.testing import TINY_PARAMS, random_meta_weights, write_tiny_checkpoint


def _build(ckpt, tokenizer, **kwargs) -> Llama:
    kwargs = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", "dtype": "fp32", **kwargs}
    return Llama.build(str(ckpt), tokenizer, **kwargs)


def _edit_params(ckpt: Path, **changes) -> None:
    """Change params.json; a value of ... removes the key."""
    params = json.loads((ckpt / "params.json").read_text())
    params.update(changes)
    (ckpt / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not ...}))


def _cut_shard(ckpt: Path) -> None:
    shard = ckpt / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])


def _scramble_shard(ckpt: Path) -> None:
    """Overwrite the start of the pickled index (the file keeps its size and zip directory)."""
    shard = ckpt / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl") + 40
    data[start:start + 200] = bytes(range(200))
    shard.write_bytes(bytes(data))


def _mix_shards(ckpt: Path) -> None:
    """Shard 01 of another, bigger model beside shard 00 of this one."""
    other = write_tiny_checkpoint(ckpt.parent / "other", n_shards=2,
                                  params={**TINY_PARAMS, "dim": 128, "n_heads": 8})
    write_tiny_checkpoint(ckpt, n_shards=2)
    shutil.copy(other / "consolidated.01.pth", ckpt / "consolidated.01.pth")


# name -> (how to damage a copy of the tiny checkpoint, what the error must say)
CHECKPOINT_MISTAKES = {
    "ckpt_dir_missing": (lambda c: shutil.rmtree(c), r"checkpoint directory not found: '.*ckpt'; pass --ckpt_dir"),
    "no_shards": (lambda c: (c / "consolidated.00.pth").unlink(),
                  r"no checkpoint shards \(consolidated\.\*\.pth\) in '.*ckpt'"),
    "shard_numbering_gap": (lambda c: (c / "consolidated.00.pth").rename(c / "consolidated.01.pth"),
                            r"numbered \[1\]; expected consolidated\.00\.pth"),
    "params_missing": (lambda c: (c / "params.json").unlink(), r"params\.json' is missing"),
    "params_not_json": (lambda c: (c / "params.json").write_text('{"dim": 64,'), r"cannot read '[^']*params\.json' \(JSONDecodeError"),
    "params_not_object": (lambda c: (c / "params.json").write_text("[64]"), r"params\.json' holds a JSON list, not an object"),
    "params_missing_keys": (lambda c: _edit_params(c, n_heads=..., n_layers=...),
                            r"params\.json' lacks required keys \['n_layers', 'n_heads'\]"),
    "params_wrong_type": (lambda c: _edit_params(c, dim="64"), r"params\.json': dim = '64' is invalid, it must be a positive integer"),
    "params_negative": (lambda c: _edit_params(c, norm_eps=-1), r"norm_eps = -1 is invalid, it must be a positive number"),
    "params_heads_do_not_fit": (lambda c: _edit_params(c, n_heads=3), r"dim=64, n_heads=3, n_kv_heads=2 do not fit together"),
    "params_unknown_chat_format": (lambda c: _edit_params(c, chat_format="vicuna"), r"chat_format='vicuna' is invalid, it must be one of llama2"),
    "truncated_shard": (_cut_shard, r"cannot read checkpoint shard '.*ckpt/consolidated\.00\.pth': it is truncated or corrupted"),
    "corrupted_shard": (_scramble_shard, r"'.*ckpt/consolidated\.00\.pth'.* corrupted"),
    "shapes_do_not_fit_params": (lambda c: _edit_params(c, dim=128, n_heads=8),
                                 r"weight 'tok_embeddings\.weight' in '.*ckpt' has shape \(32000, 64\) .* does not fit params\.json"),
    "layers_do_not_fit_params": (lambda c: _edit_params(c, n_layers=3), r"does not fit params\.json: missing weights \['layers\.2\."),
    "kv_heads_do_not_fit_params": (lambda c: _edit_params(c, n_kv_heads=4), r"weight 'layers\.0\.attention\.wk\.weight' .* does not fit"),
    "shards_of_two_models": (_mix_shards, r"does not fit params\.json|cannot be joined"),
    "vocab_size_differs_from_tokenizer": (lambda c: _edit_params(c, vocab_size=32064),
                                          r"tokenizer .* has 32000 tokens but the model in '.*ckpt' has vocab_size 32064"),
}


@pytest.mark.parametrize("mistake", CHECKPOINT_MISTAKES)
def test_checkpoint_mistakes_are_named(mistake, tmp_path, tiny_ckpt, sp_tokenizer):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    damage, message = CHECKPOINT_MISTAKES[mistake]
    damage(ckpt)
    with pytest.raises(LlamaError, match=message):
        _build(ckpt, sp_tokenizer)


@pytest.mark.parametrize("kind, message", [
    ("missing", r"tokenizer file not found: '.*nope\.model'; pass --tokenizer_path"),
    ("unknown", r"'.*notes\.txt' is not a tokenizer this engine can read"),
    ("none_in_ckpt_dir", r"no tokenizer\.model or tokenizer\.json in '.*'; pass --tokenizer_path"),
])
def test_tokenizer_mistakes_are_named(kind, message, tmp_path, tiny_ckpt):
    path = {"missing": tmp_path / "nope.model", "unknown": tmp_path / "notes.txt", "none_in_ckpt_dir": None}[kind]
    if kind == "unknown":
        path.write_text("just some notes\n")
    with pytest.raises(LlamaError, match=message):
        _build(tiny_ckpt, None if path is None else str(path))


# ---- numerical and memory failures -----------------------------------------------------

@pytest.mark.parametrize("case", ["fp16_overflow", "inf_weight"])
def test_nan_or_inf_logits_name_the_dtype(case, tmp_path, sp_tokenizer):
    weights = random_meta_weights(TINY_PARAMS)
    if case == "fp16_overflow":
        weights["output.weight"] *= 1e4  # logits of order 1e5: fine in fp32, inf in fp16
    else:
        weights["norm.weight"][0] = float("inf")
    from llama.checkpoint import save_checkpoint
    save_checkpoint(weights, dict(TINY_PARAMS), str(tmp_path))
    dtype = "fp16" if case == "fp16_overflow" else "fp32"
    gen = _build(tmp_path, sp_tokenizer, dtype=dtype)
    with pytest.raises(LlamaError, match=rf"NaN or inf logits \(model dtype torch\.float{dtype[2:]}\).*"
                                         r"fp16 overflow: build with dtype='bf16' or dtype='fp32'"):
        gen.text_completion(["Hello"], temperature=0, max_gen_len=4)
    if case == "fp16_overflow":  # the same weights in fp32 are fine
        assert _build(tmp_path, sp_tokenizer).text_completion(["Hello"], temperature=0, max_gen_len=4)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "not enough memory: you tried to allocate 4294967296 bytes")])
def test_kv_cache_out_of_memory_says_how_much_and_what_to_do(error, monkeypatch, tiny_ckpt, sp_tokenizer):
    def no_memory(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(llama.model.cache.KVCache, "__init__", no_memory)
    with pytest.raises(LlamaError) as info:
        _build(tiny_ckpt, sp_tokenizer, max_seq_len=4096, max_batch_size=8)
    need = kv_cache_bytes(ModelArgs.from_params(TINY_PARAMS), 8, 4096, 1, torch.float32)
    assert need == 2 * 2 * 2 * 16 * 8 * 4096 * 4  # K and V, 2 layers, 2 kv heads of 16, fp32
    message = str(info.value)
    assert f"needs {need / 2**30:.2f} GiB" in message
    assert "max_batch_size=8 x max_seq_len=4096" in message
    assert "lower --max_batch_size or --max_seq_len" in message


def test_other_errors_while_allocating_are_not_disguised(monkeypatch, tiny_ckpt, sp_tokenizer):
    def broken(self, *args, **kwargs):
        raise RuntimeError("some unrelated bug")

    monkeypatch.setattr(llama.model.cache.KVCache, "__init__", broken)
    with pytest.raises(RuntimeError, match="some unrelated bug"):
        _build(tiny_ckpt, sp_tokenizer)


def test_bad_dist_timeout_is_named(monkeypatch):
    from llama.runtime.distributed import timeout_s

    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "soon")
    with pytest.raises(LlamaError, match="LLAMA_DIST_TIMEOUT='soon' must be a positive number of seconds"):
        timeout_s()
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "2.5")
    assert timeout_s() == 2.5


# ---- the example scripts -----------------------------------------------------------------

@pytest.fixture(scope="module")
def cut_ckpt(tmp_path_factory, tiny_ckpt) -> Path:
    ckpt = tmp_path_factory.mktemp("cut") / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _cut_shard(ckpt)
    return ckpt


@pytest.mark.parametrize("script, args, message", [
    ("example_text_completion.py", ["--ckpt_dir", "{tmp}/missing"], r"checkpoint directory not found: '.*missing'"),
    ("example_chat_completion.py", ["--ckpt_dir", "{cut}", "--tokenizer_path", "{tok}"],
     r"cannot read checkpoint shard '.*consolidated\.00\.pth': it is truncated or corrupted"),
    ("example_text_completion.py", ["--ckpt_dir", "{ckpt}", "--tokenizer_path", "{tok}", "--max_seq_len", "8"],
     r"prompt 0 has \d+ tokens, \d+ too many for max_seq_len=8"),
    ("example_chat_completion.py", ["--ckpt_dir", "{ckpt}", "--tokenizer_path", "{tok}", "--top_p", "1.5"],
     r"top_p=1\.5 must be a finite number in \(0, 1\]"),
])
@pytest.mark.subprocess
def test_example_scripts_print_one_line_and_exit_1(script, args, message, tmp_path, tiny_ckpt, cut_ckpt, sp_tokenizer):
    paths = {"tmp": tmp_path, "ckpt": tiny_ckpt, "cut": cut_ckpt, "tok": sp_tokenizer}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(CUDA_VISIBLE_DEVICES="", LLAMA_DTYPE="fp32", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, script, *[a.format(**paths) for a in args]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.search(message, lines[0]), lines[0]
