"""Models whose next token is set by hand."""

def steer_model(model, transitions: dict) -> None:
    """Make a world-of-one `model` a lookup table: after token a, token b gets logit
    transitions[a][b] and every other token 0; after a token not in `transitions` every token
    gets 0 (uniform). The blocks' output projections are zeroed (the residual stream stays the
    embedding), token a embeds as the unit vector e_i (i its place in `transitions`), the final
    norm maps that to sqrt(dim) e_i (up to norm_eps), and output row b holds logit / sqrt(dim)
    at column i. The sampler and the stop rules then meet distributions known in advance."""
    import torch

    dim = model.params.dim
    assert len(transitions) <= dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        model.norm.weight.fill_(1.0)
        for i, (a, row) in enumerate(transitions.items()):
            model.tok_embeddings.weight[a, i] = 1.0
            for b, logit in row.items():
                model.output.weight[b, i] = logit / dim ** 0.5


# After SOURCE, the steered tiny model gives TOP's three tokens these logits, every other 0.
SOURCE, TOP = 450, {319: 12.0, 2107: 11.0, 4123: 10.5}


def steered_tiny(tiny_ckpt, sp_tokenizer, max_batch_size: int = 300):
    """The tiny checkpoint in fp32, steered so that SOURCE is followed by TOP's distribution
    (the global torch RNG left as it was)."""
    import torch

    from llama import Llama

    state = torch.get_rng_state()
    generator = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=24, max_batch_size=max_batch_size,
                            device="cpu", dtype="fp32")
    torch.set_rng_state(state)
    steer_model(generator.model, {SOURCE: TOP})
    return generator
