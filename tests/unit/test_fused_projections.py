"""Q/K/V and W1|W3 fused into one product each (Transformer.fuse_projections, done at load on
CUDA): the same results as the separate products, Meta's names kept in the state_dict, no
memory added, and weights loaded afterwards reach the fused product."""

import pytest
import torch

from llama import Llama


def build(tiny_ckpt, sp_tokenizer, dtype, **kwargs):
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=128, max_batch_size=2, device="cpu", dtype=dtype,
                       **kwargs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_projections_give_the_separate_products_results(tiny_ckpt, sp_tokenizer, dtype):
    separate, fused = build(tiny_ckpt, sp_tokenizer, dtype), build(tiny_ckpt, sp_tokenizer, dtype)
    expected_state = separate.model.state_dict()
    fused.model.fuse_projections()
    attention, ffn = fused.model.layers[0].attention, fused.model.layers[0].feed_forward
    assert attention.wqkv is not None and ffn.w13 is not None
    assert attention.wk.weight.data_ptr() == attention.wqkv.data_ptr() + attention.wq.weight.numel() * \
        attention.wqkv.element_size()  # a view: no memory added
    state = fused.model.state_dict()
    assert list(state) == list(expected_state)  # Meta's names, nothing more
    assert all(torch.equal(state[k], expected_state[k]) for k in state)

    prompt = torch.tensor([fused.tokenizer.encode("Fused or not, the same answer", bos=True, eos=False)])
    tolerance = 1e-5 if dtype == "fp32" else 0.05
    torch.testing.assert_close(fused.model(prompt), separate.model(prompt), rtol=0, atol=tolerance)
    prompts = ["One two three", "The weather today is"]
    got = fused.text_completion(prompts, temperature=0, max_gen_len=16)
    assert got == separate.text_completion(prompts, temperature=0, max_gen_len=16)


def test_weights_loaded_after_fusing_reach_the_fused_product(tiny_ckpt, sp_tokenizer):
    llama = build(tiny_ckpt, sp_tokenizer, "fp32")
    llama.model.fuse_projections()
    state = llama.model.state_dict()
    changed = {k: (v * 0.5 if k.endswith(("wv.weight", "w3.weight")) else v) for k, v in state.items()}
    llama.model.load_state_dict(changed)
    reference = build(tiny_ckpt, sp_tokenizer, "fp32")
    reference.model.load_state_dict(changed)
    prompt = torch.tensor([[1, 450, 7483, 310, 3444]])
    torch.testing.assert_close(llama.model(prompt), reference.model(prompt), rtol=0, atol=1e-5)
    assert not torch.allclose(llama.model(prompt), build(tiny_ckpt, sp_tokenizer, "fp32").model(prompt))


def test_quantized_layers_are_not_fused(tiny_ckpt, sp_tokenizer):
    llama = build(tiny_ckpt, sp_tokenizer, "fp32", quantize="int8")
    llama.model.fuse_projections()
    assert llama.model.layers[0].attention.wqkv is None and llama.model.layers[0].feed_forward.w13 is None
