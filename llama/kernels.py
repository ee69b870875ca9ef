"""How the model's matmuls run on this machine: the kernel policy, applied from outside the
model around each forward pass (by the decode loop), never by flags flipped inside it.

Today one rule, measured on this project's AVX512-BF16 CPU: for a single row (batch-1 decode),
PyTorch's plain CPU kernels read bf16 weights about twice as fast as oneDNN's, whose fixed
cost pays off only from two rows up. Native kernels chosen per machine by measurement are to
join this module.
"""

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def matmul_policy(tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, the kernels best for a forward pass over `tokens` [B, S]."""
    if not (tokens.numel() == 1 and tokens.device.type == "cpu"):
        yield
        return
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # plain kernels for the single row
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved
