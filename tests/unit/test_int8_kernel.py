"""The int8 decode kernel itself: a decode-sized input (one row) runs torch's fused
_weight_int8pack_mm on the int8 weights and their scales, and must equal the product with the
dequantized weight (q * scale) computed here in fp32; a prefill-sized input takes the
dequantize path and must equal it too. A quantized bf16 model's decode steps go through the
fused kernel."""

import pytest
import torch

from llama.model.quantize.int8 import FUSED_MAX_ROWS, Int8Linear, quantize_rows

# bf16 activations and outputs: one bf16 rounding of the result and of the scales, relative.
RTOL = 2e-2


def _reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    weight = layer.q.float() * layer.scale.float()[:, None]
    return x.float() @ weight.T


@pytest.fixture
def fused_calls(monkeypatch):
    """The inputs' row counts of every call of the fused kernel in the block."""
    real, calls = torch.ops.aten._weight_int8pack_mm, []

    def spy(x, q, scale):
        calls.append(x.shape[0])
        return real(x, q, scale)

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", spy)
    return calls


@pytest.mark.parametrize("rows", [1, 3, FUSED_MAX_ROWS + 8])
def test_int8_linear_equals_the_dequantized_product(rows, fused_calls):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=g) * torch.linspace(0.1, 3, 96)[:, None]).to(torch.bfloat16)
    layer = Int8Linear(weight)
    assert layer.fused
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    out = layer(x)
    expected = _reference(x, layer)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    assert torch.allclose(out.float(), expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())
    assert fused_calls == ([rows] if rows <= FUSED_MAX_ROWS else [])


def test_quantized_rows_reconstruct_the_weight_within_half_a_step():
    """q * scale is within scale / 2 of every weight, negative outliers included."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 128, generator=g)
    weight[3, 7], weight[5, 9] = -40.0, 25.0  # outliers of both signs
    q, scale = quantize_rows(weight)
    error = (q.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6).all())
    assert scale[3] == pytest.approx(40.0 / 127) and scale[5] == pytest.approx(25.0 / 127)


def test_a_quantized_bf16_decode_step_runs_the_fused_kernel(tiny_ckpt, sp_tokenizer, fused_calls):
    from llama import Llama

    state = torch.get_rng_state()
    gen = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=2, device="cpu",
                      dtype="bf16", quantize="int8")
    torch.set_rng_state(state)
    gen.generate([[1, 450, 7483]], max_gen_len=3, temperature=0, stop_tokens=[])
    per_pass = 7 * gen.model.n_layers + 1  # wq wk wv wo w1 w2 w3 per layer, and the output
    # The 3-token prefill (the output layer on its last position only), then two one-row steps.
    assert fused_calls == [3] * (per_pass - 1) + [1] + [1] * (2 * per_pass)
