"""A PyTorch engine for LLaMA-family models with Meta's published API."""

from .chat_format import ChatFormat, Dialog, Message
from .errors import LlamaError
from .generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama, sample_top_p
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ChatFormat", "ModelArgs", "Transformer",
           "CompletionPrediction", "ChatPrediction", "InfillingPrediction", "LlamaError", "sample_top_p"]
