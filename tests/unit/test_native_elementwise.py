"""The fused bf16 elementwise passes (llama.native.elementwise) against the PyTorch code they
replace in llama/model/transformer.py: the residual add exactly, RMSNorm and SwiGLU to the bit
except where fp32 sums or e^x land on the other side of a bf16 rounding (one step of bf16, in
a small share of elements); views of a fused product; and the model running them."""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.errors import LlamaError
from llama.model import transformer
from llama.native import elementwise


@pytest.fixture(autouse=True)
def _needs_the_path():
    if not elementwise.fused(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("the native library's AVX-512 path does not run here")


def _assert_within_one_rounding(ours: torch.Tensor, ref: torch.Tensor, share: float = 0.01) -> None:
    """Equal but for elements one bf16 step apart, in at most `share` of them."""
    assert ours.dtype == ref.dtype == torch.bfloat16 and ours.shape == ref.shape
    ours, ref = ours.float(), ref.float()
    differ = ours != ref
    step = ref.abs() * 2.0 ** -7 + 1e-30  # a bf16 step near each value (8 bits of mantissa)
    assert ((ours - ref).abs()[differ] <= step[differ] * 1.01).all(), "more than one bf16 rounding apart"
    assert differ.float().mean() <= share, f"{differ.float().mean():.2%} of the elements differ"


@pytest.mark.parametrize("rows, dim", [(1, 576), (7, 64), (33, 2048), (5, 100)])
def test_add_and_rms_norm_equal_pytorchs(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x, add = (3 * torch.randn(rows, dim, generator=g)).bfloat16(), torch.randn(rows, dim, generator=g).bfloat16()
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).bfloat16()
    h, y = elementwise.add_rms_norm(x, add, weight, 1e-5)
    ref_h = x + add
    assert torch.equal(h, ref_h)
    ref_y = F.rms_norm(ref_h.float(), (dim,), eps=1e-5).type_as(ref_h) * weight
    _assert_within_one_rounding(y, ref_y)
    same, y_alone = elementwise.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    _assert_within_one_rounding(y_alone, F.rms_norm(x.float(), (dim,), eps=1e-5).type_as(x) * weight)


def test_swiglu_equals_pytorchs_on_the_halves_of_a_fused_product():
    g = torch.Generator().manual_seed(0)
    fused = (4 * torch.randn(2, 9, 2 * 1536, generator=g)).bfloat16()
    gate, up = fused.chunk(2, dim=-1)  # views with a row stride of 2 * 1536
    ours = elementwise.swiglu(gate, up)
    _assert_within_one_rounding(ours, F.silu(gate) * up)
    assert ours.shape == gate.shape and ours.is_contiguous()
    # separate tensors, and one row
    gate, up = gate.contiguous(), up.contiguous()
    _assert_within_one_rounding(elementwise.swiglu(gate[:1, :1], up[:1, :1]), F.silu(gate[:1, :1]) * up[:1, :1])


def test_nan_and_inf_propagate_as_in_pytorch():
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    _, y = elementwise.add_rms_norm(x, None, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    assert y[0].isnan().all() and not y[1].isnan().any()
    gate = torch.tensor([[float("nan"), float("inf"), 0.0, 5.0, float("-inf")]], dtype=torch.bfloat16)
    up = torch.tensor([[1.0, 1.0, float("inf"), 2.0, 1.0]], dtype=torch.bfloat16)
    ours = elementwise.swiglu(gate, up)
    torch.testing.assert_close(ours[:, :4], (F.silu(gate) * up)[:, :4], equal_nan=True)
    assert not ours[0, 4].isfinite()  # PyTorch's is nan (-inf / inf), ours -inf: not a number either way


def test_what_it_cannot_take_is_refused_by_name():
    with pytest.raises(LlamaError, match="weight must be bf16"):
        elementwise.add_rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), None, torch.ones(8), 1e-5)
    with pytest.raises(LlamaError, match="x is torch.float32"):
        elementwise.add_rms_norm(torch.ones(2, 8), None, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(LlamaError, match="differ"):
        elementwise.swiglu(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16))


def test_a_bf16_model_runs_them_and_an_fp32_model_does_not(tiny_ckpt, sp_tokenizer, monkeypatch):
    calls = []
    norm, swiglu = elementwise.add_rms_norm, elementwise.swiglu

    def counted_norm(x, add, *args):
        calls.append("norm" if add is None else "add+norm")
        return norm(x, add, *args)

    def counted_swiglu(*args):
        calls.append("swiglu")
        return swiglu(*args)

    monkeypatch.setattr(elementwise, "add_rms_norm", counted_norm)
    monkeypatch.setattr(elementwise, "swiglu", counted_swiglu)
    for dtype in ("fp32", "bf16"):
        calls.clear()
        g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=1, device="cpu", dtype=dtype)
        g.model(torch.tensor([[1, 2, 3]]), 0)
        per_layer = ["norm", "add+norm", "swiglu"]  # attention_norm, the residual add with ffn_norm, SwiGLU
        assert calls == ([] if dtype == "fp32" else per_layer * g.model.n_layers + ["norm"]), dtype
    assert transformer.elementwise is elementwise
