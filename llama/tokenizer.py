"""Tokenizers with Meta's interface: encode(s, bos, eos), decode, bos_id, eos_id, pad_id,
n_words, plus stop_tokens (the ids that end a generation).

`Tokenizer(path)` looks at the file and returns the matching kind.
"""

import os
from typing import AbstractSet, List, Sequence

from sentencepiece import SentencePieceProcessor

from .errors import LlamaError


class Tokenizer:
    """Base class and factory: `Tokenizer(path)` picks the implementation from the file."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int

    def __new__(cls, model_path: str) -> "Tokenizer":
        if cls is not Tokenizer:
            return super().__new__(cls)
        if not os.path.isfile(model_path):
            raise LlamaError(f"tokenizer file not found: {model_path!r}; pass --tokenizer_path "
                             f"pointing at the model's tokenizer.model")
        kind = _sniff_kind(model_path)
        return super().__new__(_KINDS[kind])

    @property
    def stop_tokens(self) -> AbstractSet[int]:
        return frozenset({self.eos_id})

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        raise NotImplementedError

    def decode(self, t: Sequence[int]) -> str:
        raise NotImplementedError


def _sniff_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    # A sentencepiece model is a protobuf whose first field (the piece list) has tag 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise LlamaError(f"{path!r} is not a tokenizer this engine can read; expected a "
                     f"sentencepiece tokenizer.model")


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 sentencepiece tokenizer."""

    def __init__(self, model_path: str):
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as exc:
            raise LlamaError(f"cannot read sentencepiece tokenizer {model_path!r}: {exc}") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise LlamaError(f"can only encode text (str), got {type(s).__name__}: {s!r:.80}")
        t = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(list(t))


_KINDS = {"sentencepiece": SentencePieceTokenizer}
