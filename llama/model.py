"""The LLaMA transformer: RMSNorm, rotary embedding, grouped-query attention with a
KV cache, SwiGLU feed-forward. Linear and embedding layers are the model-parallel ones of
llama.parallel, so each rank holds only its slice; the model knows nothing else about
ranks or devices, and nothing of tokenizers, chat formats, quantization or kernel choice.

Shapes: B batch, S tokens in this call, L cached length, H query heads, K key/value
heads (both local to this rank), D head dim.
"""

import functools
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # feed-forward hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context frequency scaling
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: Dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a params.json dict; keys this engine does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in params.items() if k in known and v is not None}
        values.update(overrides)
        return cls(**values)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the optional multiplier, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability, then return to the activation dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Rotation frequency of each of the D/2 pairs, shape [D/2], fp32."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if args.use_scaled_rope:
        freqs = _llama31_scale(freqs, args)
    return freqs


def _llama31_scale(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 scaling: keep short wavelengths, divide long ones by the factor, blend between."""
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    context = float(args.rope_original_context)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, blended)
    return torch.where(wavelen < context / high, freqs, scaled)


def rotation_table(args: ModelArgs, max_seq_len: int, complex_form: bool = True) -> torch.Tensor:
    """Each position's rotation of each of the D/2 pairs, from fp32 angles, on the CPU:
    complex64 [max_seq_len, D/2] of unit length, or (cos, sin) [max_seq_len, D/2, 2]
    (the form apply_rotary takes on devices without good complex support)."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_frequencies(args))
    # cos and sin of the fp32 angles (as Meta's and HF's) taken in fp64 and rounded once: the
    # same values in both forms, and clear of torch's fp32 cos, whose first call in a process
    # was seen off by 1.5e-4 now and then (torch 2.13, 2 threads, an Intel Xeon with AMX).
    cos, sin = angles.double().cos().float(), angles.double().sin().float()
    return torch.complex(cos, sin) if complex_form else torch.stack((cos, sin), dim=-1)


def complex_rotation(device: torch.device) -> bool:
    """Whether the rotary table is complex on `device`. Complex tensors are the fastest form
    on CPU (one fused multiply: measured 6-10x faster than the real form there) and on CUDA;
    MPS has only partial complex support (none before macOS 14; indexing and copies of
    complex tensors are missing in some torch versions), so it gets the real form."""
    return device.type != "mps"


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate interleaved pairs (Meta's layout) by `rotation` in fp32; return `dtype`.

    x: [B, S, H, D]; rotation: rows of rotation_table(), [B, S, 1, D/2] complex or
    [B, S, 1, D/2, 2] (cos, sin). Both forms give the same result up to fp32 rounding.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    if rotation.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(dtype)
    real, imag = pairs.unbind(-1)
    cos, sin = rotation.unbind(-1)
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(dtype)


def kv_cache_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the KV cache, and so of attention. PyTorch's CPU attention kernels are
    ~100x slower in bf16/fp16 than in fp32 for decode-sized inputs, so on the CPU the cache
    stays in fp32 (it is small beside the weights there); elsewhere it follows the model."""
    return torch.float32 if device.type == "cpu" else model_dtype


class KVCache(nn.Module):
    """Static per-layer cache; row b's token at position p lives in slot p."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               slots: Optional[torch.Tensor] = None, fresh: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, S, K, D] at `positions` [B, S] of the cache rows `slots` [B] (default:
        rows 0..B-1); return those rows' first kv_len positions [B, L, K, D]. fresh: every row
        starts at position 0 and L == S, so the keys are k and v themselves (no gather)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if slots is None:
            batch = k.shape[0]
            rows = torch.arange(batch, device=k.device).unsqueeze(1)
            self.k[rows, positions] = k
            self.v[rows, positions] = v
            return self.k[:batch, :kv_len], self.v[:batch, :kv_len]
        rows = slots.unsqueeze(1)
        self.k[rows, positions] = k
        self.v[rows, positions] = v
        if fresh:
            return k, v
        return self.k[slots, :kv_len], self.v[slots, :kv_len]  # a gather: a copy of those rows


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of q [B, H, S, D] over k, v [B, K, L, D] (H a multiple of K); returns [B, H, S, D].

    mask: bool [B, 1, S, L], True where a query may see a key; None: every query sees the
    keys up to its own position, the last S of the L (causal; all L keys when S == 1).

    A mask goes to the kernel together with unequal head counts only where a kernel takes
    that call well: the CPU's, and a CUDA device's where an efficient kernel accepts it
    (grouped_mask_kernel). Elsewhere (flash attention takes no mask, older memory-efficient
    kernels no grouped heads, and MPS with torch 2.6 aborts on it) each key/value head's
    G = H/K query heads are folded into its query rows instead, [B, K, G*S, D], which the
    memory-efficient kernel takes with the mask repeated per group.
    """
    heads, kv_heads, seqlen = q.shape[1], k.shape[1], q.shape[2]
    if mask is None:  # flash attention, grouped heads included
        return F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
    if heads == kv_heads or grouped_mask_kernel(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    batch, groups, dim = q.shape[0], heads // kv_heads, q.shape[3]
    folded = q.reshape(batch, kv_heads, groups * seqlen, dim)  # query head h = kv head h // G
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(1, 1, groups, 1))
    return out.reshape(batch, heads, seqlen, dim)  # CUDA's kernels may return it strided


def attention_device_type(t: torch.Tensor) -> str:
    """The device type attend() chooses its form for (a seam for tests without accelerators)."""
    return t.device.type


def grouped_mask_kernel(q: torch.Tensor) -> bool:
    """Whether attend() may send a mask together with grouped heads to the kernel for q."""
    device_type = attention_device_type(q)
    if device_type == "cpu":
        return True
    if device_type != "cuda":
        return False
    return efficient_kernel_takes_grouped_mask(q.device, q.dtype, q.shape[-1])


@functools.lru_cache(maxsize=None)
def efficient_kernel_takes_grouped_mask(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether an efficient attention kernel (not PyTorch's math one) accepts a boolean mask
    with grouped heads on this CUDA device in this dtype: asked once, on tiny tensors. Where it
    does (torch 2.11 on an H200, bf16; not fp32), a ragged batch of 4 decoded 1.08x faster
    unfolded than folded; where it does not, the math kernel would take that call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 4, 1, head_dim, device=device, dtype=dtype)
    k = torch.zeros(1, 2, 8, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 1, 8, device=device, dtype=torch.bool)
    try:
        with warnings.catch_warnings():  # torch explains each kernel's refusal: not news here
            warnings.simplefilter("ignore")
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
        return True
    except RuntimeError:
        return False


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
        # The dtype a prompt's attention over its own keys runs in; None: the cache's. Set from
        # outside, where kernels are chosen by measurement (llama.kernels.prompt_attention_dtype).
        self.prompt_attention_dtype: Optional[torch.dtype] = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_len: int,
                rotation: torch.Tensor, mask: Optional[torch.Tensor],
                slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q = self.wq(x).view(batch, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seqlen, self.n_local_kv_heads, self.head_dim)
        assert self.cache is not None, "call Transformer.setup_caches() before forward()"
        dtype = self.cache.k.dtype  # attention runs in the cache's dtype (a fresh prompt's: see below)
        q, k = apply_rotary(q, rotation, dtype), apply_rotary(k, rotation, dtype)
        # fresh (no gather from the cache) only where the keys are exactly these S tokens
        fresh = mask is None and kv_len == seqlen
        keys, values = self.cache.update(positions, k, v, kv_len, slots, fresh=fresh)
        if fresh and seqlen > 1 and self.prompt_attention_dtype is not None:  # the cache keeps its dtype
            q, keys, values = (t.to(self.prompt_attention_dtype) for t in (q, keys, values))
        out = attend(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, -1).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden)
        self.w2 = RowParallelLinear(hidden, args.dim)
        self.w3 = ColumnParallelLinear(args.dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
                slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, kv_len, rotation, mask, slots)
        return h + self.feed_forward(self.ffn_norm(h))


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

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate KV caches and rotary tables on the weights' device, in their dtype."""
        weight = self.norm.weight
        device, dtype = weight.device, weight.dtype
        self.rope = rotation_table(self.params, max_seq_len, complex_rotation(device)).to(device)
        cache_dtype = kv_cache_dtype(device, dtype)
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim,
                                 cache_dtype, device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                kv_len: Optional[int] = None, last_index: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run tokens [B, S] through the model, appending them to the KV cache.

        start_pos: position of tokens[:, 0], an int shared by all rows (Meta's signature)
            or a tensor [B] with one position per row (positions past max_seq_len - 1, which
            only padding can reach, are clamped there).
        kv_len: how many cache slots attention reads; defaults to max(start_pos) + S.
        last_index: optional [B] index into S; if given, return logits only there, [B, V].
        slots: optional [B] cache rows the rows use (default: rows 0..B-1), so a scheduler can
            run any subset of the cache's rows.
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
        # slots read: a prefill from 0, or one new token per row at a common position;
        # otherwise each row masks keys past its own position.
        if _rows_end_at(start_pos, seqlen, kv_len):
            mask = None
        else:
            cache_slots = torch.arange(kv_len, device=tokens.device)
            mask = (cache_slots <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, L]

        h = self.tok_embeddings(tokens)
        if slots is not None:
            slots = slots.to(tokens.device)
        for layer in self.layers:
            h = layer(h, positions, kv_len, rotation, mask, slots)
        h = self.norm(h)
        if last_index is not None:
            h = h[torch.arange(batch, device=h.device), last_index.to(h.device)]
        return self.output(h).float()


def _rows_end_at(start_pos: Union[int, torch.Tensor], seqlen: int, kv_len: int) -> bool:
    """True if every row's S tokens are the last S of the kv_len slots and either S == 1
    or the rows start at 0 (where causal masking from the top equals that from the end)."""
    if isinstance(start_pos, int):
        return start_pos + seqlen == kv_len and (seqlen == 1 or start_pos == 0)
    # One host read of the positions (the decode loop reads its sampled tokens each step anyway).
    return seqlen == 1 and bool((start_pos == kv_len - 1).all())
