"""benchmarks/scale_gguf.py, which gives llama.cpp the --scale benchmark's weights at equal bits:
a checkpoint written as a GGUF file holds the same tensors bit for bit, named as llama.cpp's
"llama" architecture names them, and Meta's Llama 3 vocabulary as GPT-2-style BPE."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.family import write_family_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scale_gguf  # noqa: E402


def test_each_byte_has_its_own_printable_character():
    table = scale_gguf.byte_characters()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("~")] == "~"
    assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"  # GPT-2's Ġ and Ċ


@pytest.mark.slow
def test_a_checkpoint_becomes_a_gguf_with_its_bits_and_vocabulary(tmp_path, llama3_tokenizer):
    import gguf

    ckpt = write_family_checkpoint(tmp_path / "llama3", llama3_tokenizer, dtype=torch.bfloat16)
    scale_gguf.write_bf16(ckpt, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    state = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    tensors = {t.name: t for t in reader.tensors}
    for ours, theirs in [("tok_embeddings.weight", "token_embd.weight"), ("layers.1.attention.wk.weight",
                         "blk.1.attn_k.weight"), ("layers.0.feed_forward.w2.weight", "blk.0.ffn_down.weight")]:
        want = state[ours].view(torch.int16).numpy().view(np.uint16)
        got = np.asarray(tensors[theirs].data).view(np.uint16).reshape(want.shape)
        assert tensors[theirs].tensor_type == gguf.GGMLQuantizationType.BF16 and (got == want).all(), theirs
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data)
    assert np.array_equal(norm, state["layers.0.attention_norm.weight"].float().numpy())
    tokens = reader.fields["tokenizer.ggml.tokens"]
    token = lambda i: bytes(tokens.parts[tokens.data[i]]).decode()
    assert len(tokens.data) == 128256 and token(9906) == "Hello" and token(1917) == "\u0120world"
    assert token(128000) == "<|begin_of_text|>"
    assert len(reader.fields["tokenizer.ggml.merges"].data) == 280147  # as in HF's tokenizer.json
