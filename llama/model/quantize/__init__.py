"""Weight-only quantization of a loaded model, applied from outside: every projection of the
model (attention, feed-forward, output) is a parallel layer, and quantizing swaps what
computes its product, never the layer itself, so the layer keeps its collective and
quantized models run at any model-parallel size (the way TGI's tensor-parallel wrappers
hold an inner linear). Embeddings and norms stay in the model's dtype.

    "int8"                 int8 weights with a scale per row (llama.model.quantize.int8)
    "q8_0", "q4_0", "q4_1" GGML's block layouts on the native CPU kernels (.blocks)

Layers are quantized one at a time, each float slice let go as it goes, so quantizing holds
one layer's quantized copy beside the model at a time.
"""

from typing import Optional

from ...errors import LlamaError
from ..parallel import ParallelLinear
from ..transformer import Transformer
from .blocks import block_kernel, block_layout, check_blocks
from .int8 import Int8Linear, check_int8_device

QUANTIZE_MODES = ("int8", "q8_0", "q4_0", "q4_1")

__all__ = ["QUANTIZE_MODES", "quantize_model", "quantized_layout", "Int8Linear"]


def quantize_model(model: Transformer, mode: Optional[str]) -> Transformer:
    """Quantize every projection of `model` (this rank's slices) to weight-only `mode`; None:
    leave it as it is. The checks come first: a refused model is left untouched."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise LlamaError(f"quantize={mode!r} is not supported; use one of {', '.join(QUANTIZE_MODES)} or None")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ParallelLinear)}
    weight = model.norm.weight
    if mode == "int8":
        check_int8_device(weight.device, weight.dtype)
    else:
        check_blocks(mode, weight.device, weight.dtype, layers)
    for layer in layers.values():
        kernel = Int8Linear(layer.weight) if mode == "int8" else \
            block_kernel(layer.weight, mode, output=layer is model.output)
        layer.use_kernel(kernel)
    return model


def quantized_layout(model: Transformer) -> Optional[str]:
    """The GGML layout of a model quantized to blocks ("q8_0", ...), else None."""
    return block_layout(model.layers[0].attention.wq.kernel)
