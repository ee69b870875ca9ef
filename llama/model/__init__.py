"""The network: ModelArgs (its shape), the Transformer and its layers, the model-parallel
layers (llama.model.parallel) and weight-only quantization (llama.model.quantize).

`from llama.model import ModelArgs, Transformer` works as in Meta's code."""

from .args import ModelArgs
from .transformer import Attention, FeedForward, RMSNorm, Transformer, TransformerBlock

__all__ = ["ModelArgs", "Transformer", "TransformerBlock", "Attention", "FeedForward", "RMSNorm"]
