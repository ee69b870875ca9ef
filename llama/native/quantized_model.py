"""A model's projections in GGML's block layouts (q8_0, q4_0, q4_1), for the native kernels.

Every projection (attention, feed-forward, output) becomes a NativeLinear holding only its
blocks, so the model takes the quantized bytes in memory: decode steps read the blocks with
the native kernels (llama.native.decode, chosen by llama.kernels.decode_step), and prefill
(many rows) dequantizes them a slice of rows at a time into the activations' dtype for
PyTorch's GEMM. Embeddings and norms stay in the model's dtype; in the 4-bit modes the
output projection is q8_0.
"""

from ..errors import LlamaError
from ..model import Transformer
from ..parallel import ParallelLinear
from . import NativeLinear
from .layouts import BLOCK_BYTES

OUTPUT_LAYOUT = {"q4_0": "q8_0", "q4_1": "q8_0"}  # the output projection's layout in 4-bit modes


def quantize_to_blocks(model: Transformer, layout: str) -> Transformer:
    """Swap every projection of `model` (CPU, model-parallel size 1) for a `layout` NativeLinear."""
    from ..kernels import native_problem

    if layout not in BLOCK_BYTES:
        raise LlamaError(f"layout={layout!r} is not one of {', '.join(BLOCK_BYTES)}")
    problem = native_problem(model)
    if problem is not None:
        raise LlamaError(f"quantize={layout!r} runs on native CPU kernels, which cannot run here: {problem}; "
                         f"use quantize='int8' or None")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ParallelLinear):  # at size 1 its collective does nothing
                # As llama.cpp does, 4-bit modes keep the output projection at 8 bits: it
                # costs most of their quality on small models (see README).
                kind = OUTPUT_LAYOUT.get(layout, layout) if child is model.output else layout
                setattr(parent, name, NativeLinear(child.weight.detach(), kind))  # frees the float weight
    return model
