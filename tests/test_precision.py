"""Reduced-precision modes (bf16, weight-only int8) against fp32 on the real demo model:
teacher-forced next-token agreement and perplexity on a fixed text."""

import math
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.demo import ensure_demo

TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text()[:3000]


def _score(generator: Llama, ids):
    """(greedy next-token choices, perplexity) over ids, one forward pass."""
    logits = generator.model(torch.tensor([ids]), 0)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return logits.argmax(-1), math.exp(nll.item())


@pytest.fixture(scope="module")
def demo_ids():
    ckpt = str(ensure_demo(quiet=True))
    ref = Llama.build(ckpt, max_seq_len=1024, max_batch_size=1, device="cpu", dtype="fp32")
    ids = ref.tokenizer.encode(TEXT, bos=False, eos=False)[:512]
    return ckpt, ids, _score(ref, ids)


@pytest.mark.parametrize("dtype, quantize, min_agreement, max_ppl_ratio", [
    ("bf16", None, 0.93, 1.03),
    ("bf16", "int8", 0.90, 1.05),
])
def test_reduced_precision_agrees_with_fp32(demo_ids, dtype, quantize, min_agreement, max_ppl_ratio):
    ckpt, ids, (ref_choice, ref_ppl) = demo_ids
    g = Llama.build(ckpt, max_seq_len=1024, max_batch_size=1, device="cpu", dtype=dtype, quantize=quantize)
    choice, ppl = _score(g, ids)
    agreement = (choice == ref_choice).float().mean().item()
    print(f"{dtype}/{quantize}: top-1 agreement with fp32 {agreement:.3f}, perplexity {ppl:.3f} vs {ref_ppl:.3f}")
    assert agreement >= min_agreement
    assert ppl / ref_ppl <= max_ppl_ratio


def test_quantize_rejects_unknown_mode(tiny_ckpt, sp_tokenizer):
    from llama import LlamaError

    with pytest.raises(LlamaError, match="quantize='int3'"):
        Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1, quantize="int3")
