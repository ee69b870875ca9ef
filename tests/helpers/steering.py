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
