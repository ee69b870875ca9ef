"""The LLaMA transformer: RMSNorm, rotary embedding, grouped-query attention with a KV
cache, SwiGLU feed-forward. Linear and embedding layers are the model-parallel ones of
llama.model.parallel, so each rank holds only its slice; nothing here knows of tokenizers,
chat formats, or how the weights were loaded. Attention takes the form its device runs
well (llama.model.attention); the dtype of a prompt's attention over its own keys is set
from outside, where it is chosen by measurement (llama.runtime.backend).

Shapes: B batch, S tokens in this call, L cached length, H query heads, K key/value
heads (both local to this rank), D head dim.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..native import elementwise
from ..native.attention import causal_attention
from .args import ModelArgs
from .attention import attend
from .cache import KVCache, kv_cache_dtype
from .parallel import (ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding,
                       float_product, fuse_weights)
from .rotary import apply_rotary, complex_rotation, rotation_table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if elementwise.fused(x) and self.weight.dtype == x.dtype:  # one native pass, the same roundings
            return elementwise.add_rms_norm(x, None, self.weight, self.eps)[1]
        # Normalise in fp32 for stability, then return to the activation dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight

    def add_and_norm(self, x: torch.Tensor, add: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x + add, self(x + add)), in one native pass where it runs."""
        if elementwise.fused(x) and add.dtype == self.weight.dtype == x.dtype:
            return elementwise.add_rms_norm(x, add, self.weight, self.eps)
        h = x + add
        return h, self(h)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        q_dim, kv_dim = args.n_heads * self.head_dim, args.kv_heads * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, q_dim)
        self.wk = ColumnParallelLinear(args.dim, kv_dim)
        self.wv = ColumnParallelLinear(args.dim, kv_dim)
        self.wo = RowParallelLinear(q_dim, args.dim)
        # This rank's heads: its share of wq's and wk's output features.
        self.n_local_heads = self.wq.weight.shape[0] // self.head_dim
        self.n_local_kv_heads = self.wk.weight.shape[0] // self.head_dim
        self.cache: Optional[KVCache] = None
        self.wqkv: Optional[torch.Tensor] = None  # wq, wk, wv in one weight, once fused (fuse())
        # The dtype a prompt's attention over its own keys runs in; None: the cache's. Set from
        # outside, where it is chosen by measurement (llama.runtime.backend.prompt_attention_dtype),
        # as is whether it runs on the native bf16 kernel (backend.prompt_attention_native).
        self.prompt_attention_dtype: Optional[torch.dtype] = None
        self.prompt_attention_native = False

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_len: int,
                rotation: torch.Tensor, mask: Optional[torch.Tensor],
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        if self.wqkv is not None:
            q_dim, kv_dim = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
            q, k, v = float_product(x, self.wqkv).split((q_dim, kv_dim, kv_dim), dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(batch, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        assert self.cache is not None, "call Transformer.setup_caches() before forward()"
        dtype = self.cache.attention_dtype  # the cache's, or fp32 on the CPU (a fresh prompt's: see below)
        q, k = apply_rotary(q, rotation, dtype), apply_rotary(k, rotation, dtype)
        # fresh (no gather from the cache) only where the keys are exactly these S tokens
        fresh = mask is None and kv_len == seqlen
        keys, values = self.cache.update(positions, k, v, kv_len, rows, fresh=fresh)
        if fresh and seqlen > 1 and self.prompt_attention_dtype is not None:  # the cache keeps its dtype
            if self.prompt_attention_native:  # in the projections' own layout: [B, S, heads, D]
                dtype = self.prompt_attention_dtype
                out = causal_attention(q.to(dtype), k.to(dtype), v.to(dtype))
                return self.wo(out.view(batch, seqlen, -1).to(x.dtype))
            q, keys, values = (t.to(self.prompt_attention_dtype) for t in (q, keys, values))
        out = attend(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, -1).to(x.dtype))

    def fuse(self) -> None:
        """Compute wq, wk and wv in one product from now on (llama.model.parallel.fuse_weights)."""
        self.wqkv = fuse_weights((self.wq, self.wk, self.wv))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden)
        self.w2 = RowParallelLinear(hidden, args.dim)
        self.w3 = ColumnParallelLinear(args.dim, hidden)
        self.w13: Optional[torch.Tensor] = None  # w1 and w3 in one weight, once fused (fuse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = float_product(x, self.w13).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if elementwise.fused(gate) and up.dtype == gate.dtype:  # one native pass, the same roundings
            return self.w2(elementwise.swiglu(gate, up))
        return self.w2(F.silu(gate) * up)

    def fuse(self) -> None:
        """Compute w1 and w3 in one product from now on (llama.model.parallel.fuse_weights)."""
        self.w13 = fuse_weights((self.w1, self.w3))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_len: int,
                rotation: torch.Tensor, mask: Optional[torch.Tensor],
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, normed = self.ffn_norm.add_and_norm(x, self.attention(self.attention_norm(x), positions, kv_len, rotation,
                                                                 mask, rows))
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    """Meta's Transformer. Parameter names match Meta's consolidated.*.pth files.

    vocab_parallel_embedding: split tok_embeddings across model-parallel ranks on the
    vocabulary (Llama 3's layout) instead of the embedding dim (Llama 1/2's).
    """

    def __init__(self, params: ModelArgs, vocab_parallel_embedding: bool = False):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        embedding = VocabParallelEmbedding if vocab_parallel_embedding else ParallelEmbedding
        self.tok_embeddings = embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)

    def fuse_projections(self) -> None:
        """Q/K/V and W1|W3 of every layer computed in one product each (fewer, larger kernels:
        what a GPU wants), the weights kept under Meta's names as views of the fused ones. Call
        it once the weights are on their device; quantized layers are left as they are."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate KV caches and rotary tables on the weights' device, in their dtype; params
        then give these sizes (the engine's rows and context)."""
        weight = self.norm.weight
        device, dtype = weight.device, weight.dtype
        self.rope = rotation_table(self.params, max_seq_len, complex_rotation(device)).to(device)
        cache_dtype = kv_cache_dtype(device, dtype)
        for layer in self.layers:
            attn = layer.attention
            attn.cache = None  # the old cache goes before the new one is made
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim,
                                 cache_dtype, device)
        self.params.max_batch_size, self.params.max_seq_len = max_batch_size, max_seq_len

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                kv_len: Optional[int] = None, last_index: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None, static: bool = False) -> torch.Tensor:
        """Run tokens [B, S] through the model, appending them to the KV cache.

        start_pos: position of tokens[:, 0], an int shared by all rows (Meta's signature)
            or a tensor [B] with one position per row (positions past max_seq_len - 1, which
            only padding can reach, are clamped there).
        kv_len: how many cached positions attention reads; defaults to max(start_pos) + S.
        last_index: optional [B] index into S; if given, return logits only there, [B, V].
        rows: optional [B] cache rows the batch's sequences use (default: rows 0..B-1), so a
            scheduler can run any subset of the cache's rows.
        static: read nothing on the host (for a captured step, llama.runtime.static_step): with
            per-row positions and kv_len given, every row masks the keys past its position.
        Returns fp32 logits [B, S, V] (or [B, V]).
        """
        batch, seqlen = tokens.shape
        offsets = torch.arange(seqlen, device=tokens.device)
        if isinstance(start_pos, int):
            if start_pos + seqlen > self.rope.shape[0]:
                raise ValueError(f"positions up to {start_pos + seqlen} do not fit max_seq_len "
                                 f"{self.rope.shape[0]} given to setup_caches()")
            positions = (start_pos + offsets).expand(batch, seqlen)
            kv_len = kv_len or start_pos + seqlen
        else:  # the caller keeps every real token's position below max_seq_len
            positions = (start_pos.to(tokens.device).unsqueeze(1) + offsets).clamp(max=self.rope.shape[0] - 1)
            kv_len = kv_len or int(positions.max()) + 1

        rotation = self.rope[positions].unsqueeze(2)
        # No mask (the fastest kernels) where every row's tokens sit at the end of the kv_len
        # positions read: a prefill from 0, or one new token per row at a common position;
        # otherwise each row masks keys past its own position.
        if not static and _rows_end_at(start_pos, seqlen, kv_len):
            mask = None
        else:
            cached = torch.arange(kv_len, device=tokens.device)
            mask = (cached <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, L]

        h = self.tok_embeddings(tokens)
        if rows is not None:
            rows = rows.to(tokens.device)
        for layer in self.layers:
            h = layer(h, positions, kv_len, rotation, mask, rows)
        h = self.norm(h)
        if last_index is not None:
            h = h[torch.arange(batch, device=h.device), last_index.to(h.device)]
        return self.output(h).float()


def _rows_end_at(start_pos: Union[int, torch.Tensor], seqlen: int, kv_len: int) -> bool:
    """True if every row's S tokens are the last S of the kv_len positions and either S == 1
    or the rows start at 0 (where causal masking from the top equals that from the end)."""
    if isinstance(start_pos, int):
        return start_pos + seqlen == kv_len and (seqlen == 1 or start_pos == 0)
    # One host read of the positions (the decode loop reads its sampled tokens each step anyway).
    return seqlen == 1 and bool((start_pos == kv_len - 1).all())
