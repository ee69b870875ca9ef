"""The decode step as one PyTorch function for torch.compile, the alternative to the native
step (llama.native.decode), measured against it in benchmarks/decode_step.py (and checked
against the model by the tests; it is not part of the package).

`eager_decode_step(model)` returns step(tokens [B], positions [B]) -> fp32 logits [B, V] that
does what `model(tokens[:, None], positions)[:, -1]` does, on the model's own weights and
caches, written so inductor can fuse it: rotary on real numbers (cos/sin tables instead
of complex views), static shapes (attention reads every cache slot under a mask, so
neither the batch nor the position recompiles), no Python branches on tensor values.
"""

from typing import Callable

import torch
import torch.nn.functional as F

from llama.model import Transformer

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's interleaved pairs (x[2i], x[2i+1]) rotated by angle i. x [B, H, D] fp32, cos/sin [B, 1, D/2]."""
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def eager_decode_step(model: Transformer) -> Step:
    """An eager step function (see the module docstring); torch.compile it for speed."""
    p = model.params
    n_heads, n_kv, head_dim = p.n_heads, p.kv_heads, p.head_dim
    table = torch.view_as_real(model.rope)  # [S, D/2, 2]
    cos_table, sin_table = table[..., 0].contiguous(), table[..., 1].contiguous()
    slots = torch.arange(cos_table.shape[0], device=cos_table.device)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        rows = torch.arange(batch, device=tokens.device)
        h = F.embedding(tokens, model.tok_embeddings.weight)  # [B, dim]
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
        visible = (slots.unsqueeze(0) <= positions.unsqueeze(1)).view(batch, 1, 1, -1)  # [B, 1, 1, S]
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            cache = attn.cache
            x = layer.attention_norm(h)
            q = F.linear(x, attn.wq.weight).view(batch, n_heads, head_dim).float()
            k = F.linear(x, attn.wk.weight).view(batch, n_kv, head_dim).float()
            v = F.linear(x, attn.wv.weight).view(batch, n_kv, head_dim)
            q, k = _rotate(q, cos, sin).to(cache.k.dtype), _rotate(k, cos, sin).to(cache.k.dtype)
            cache.k[rows, positions] = k
            cache.v[rows, positions] = v.to(cache.v.dtype)
            keys, values = cache.k[:batch], cache.v[:batch]  # [B, S, K, D]
            # grouped heads: query head j reads kv head j // (H / K)
            qg = q.view(batch, n_kv, n_heads // n_kv, head_dim)
            scores = torch.einsum("bgrd,bsgd->bgrs", qg, keys) * head_dim ** -0.5
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out = torch.einsum("bgrs,bsgd->bgrd", probs, values).reshape(batch, n_heads * head_dim)
            h = h + F.linear(out.to(h.dtype), attn.wo.weight)
            x = layer.ffn_norm(h)
            h = h + F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
        return F.linear(model.norm(h), model.output.weight).float()

    return step


def compiled_decode_step(model: Transformer, **compile_options) -> Step:
    """torch.compile(eager_decode_step(model)), in inference mode (weights are constants)."""
    compiled = torch.compile(eager_decode_step(model), dynamic=False, **compile_options)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(tokens, positions)

    return step
