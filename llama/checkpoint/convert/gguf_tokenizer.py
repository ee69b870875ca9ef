"""A GGUF file's tokenizer as an HF tokenizer.json, for llama.convert (its only user)."""

from typing import List, Optional

from ...errors import LlamaError
from ...tokenizer import LLAMA3_PATTERN

# llama.cpp's pre-tokenizer names -> the split regex applied before byte-level BPE.
_GGUF_PRE_SPLITS = {
    "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN,
    "qwen2": LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"),
}
_GGUF_DIGIT_SPLITTERS = ("smollm", "starcoder", "refact")  # digits one by one, then GPT-2's regex


def hf_tokenizer_json_from_gguf_vocab(tokens: List[str], merges: List[str], token_types: List[int],
                                      bos_id: Optional[int], eos_id: Optional[int], pre: str) -> str:
    """The tokenizer.json text of the byte-level BPE ('gpt2' model) described by a GGUF file's
    tokenizer.ggml.* metadata: tokens (index = id), merges ("a b"), token types (3 = control
    -> special added token, 4 = user-defined -> plain added token), and the llama.cpp
    pre-tokenizer name `pre` ('smollm', 'starcoder', 'refact': digits split individually;
    Llama 3 / Qwen2 names: their split regex; anything else: GPT-2's regex)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizerModel

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LlamaError("the GGUF vocabulary (tokenizer.ggml.tokens) repeats a token; cannot build "
                         "a tokenizer.json whose ids match the model")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizerModel(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GGUF_DIGIT_SPLITTERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GGUF_PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = {i for i, kind in enumerate(token_types) if kind == 3}
    special |= {i for i in (bos_id, eos_id) if i is not None}
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, kind in enumerate(token_types) if kind == 4])
    return tok.to_str()
