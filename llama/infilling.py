"""Code Llama infilling: the prompt Meta's codellama builds around a gap in a text.

The model sees the text before the gap (prefix) and after it (suffix) and writes the middle,
ending it with ▁<EOT>. Two layouts, token for token as Meta's `infilling_prompt_tokens`:

  PSM (default):       BOS ▁<PRE> prefix ▁<SUF> suffix ▁<MID>             -> middle ▁<EOT>
  SPM (suffix_first):  BOS ▁<PRE> ▁<SUF> suffix ▁<MID> prefix             -> middle ▁<EOT>

The prefix is encoded as ordinary text (sentencepiece's implicit leading space reads as the
space after <PRE>), the suffix without that space (it follows <SUF> directly).
"""

from dataclasses import dataclass
from typing import List

from .errors import LlamaError
from .tokenizer import INFILLING_PIECES, SentencePieceTokenizer, Tokenizer


@dataclass(frozen=True)
class InfillingTokens:
    prefix: int
    suffix: int
    middle: int
    eot: int


def infilling_tokens(tokenizer: Tokenizer) -> InfillingTokens:
    """The ids of ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; LlamaError if the tokenizer lacks them."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise LlamaError(f"text_infilling needs a Code Llama (sentencepiece) tokenizer with the pieces "
                         f"{', '.join(INFILLING_PIECES)}; this model's is a {type(tokenizer).__name__}, "
                         f"whose model was not trained to fill in text: use text_completion")
    ids = (tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id, tokenizer.eot_id)
    missing = [piece for piece, i in zip(INFILLING_PIECES, ids) if i is None]
    if missing:
        raise LlamaError(f"text_infilling needs Code Llama's infilling pieces, which tokenizer "
                         f"{tokenizer.model_path!r} lacks ({', '.join(missing)}): Llama 1/2 models were not "
                         f"trained to fill in text; use a Code Llama checkpoint (7B or 13B) with its own "
                         f"tokenizer.model, or text_completion")
    return InfillingTokens(*ids)


def infilling_prompt_tokens(tokenizer: Tokenizer, prefix: str, suffix: str,
                            suffix_first: bool = False) -> List[int]:
    """The prompt ids for filling the gap between `prefix` and `suffix` (PSM, or SPM with
    suffix_first), as in the module docstring."""
    ids = infilling_tokens(tokenizer)
    assert isinstance(tokenizer, SentencePieceTokenizer)  # infilling_tokens checked it
    prefix_ids = tokenizer.encode(prefix, bos=False, eos=False)
    suffix_ids = tokenizer.encode_infilling(suffix)
    if suffix_first:
        return [tokenizer.bos_id, ids.prefix, ids.suffix] + suffix_ids + [ids.middle] + prefix_ids
    return [tokenizer.bos_id, ids.prefix] + prefix_ids + [ids.suffix] + suffix_ids + [ids.middle]
