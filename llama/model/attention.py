"""attend(): scaled dot-product attention with grouped query heads and an optional mask, in
the form that the device's kernels take well. Which form a CUDA device takes is asked of its
kernels once per device, dtype and head size (efficient_kernel_takes_grouped_mask)."""

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F


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
    does, the unfolded call is the faster (docs/distributed.md, "On GPUs"); where it does not,
    the math kernel would take that call, so attend() folds the heads instead."""
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
