"""Rotary position embedding in Meta's layout (interleaved pairs): each position's rotation of
each pair of head dims, as a table, and applying it. Llama 3.1's long-context scaling of the
frequencies is here too."""

import math

import torch

from .args import ModelArgs


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
    on CPU (one fused multiply; docs/benchmarks.md has the measurement) and on CUDA;
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
