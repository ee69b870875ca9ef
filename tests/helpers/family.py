"""The rest of Meta's family: a Code Llama-like sentencepiece tokenizer trained on frozen
texts, and tiny checkpoints whose vocabulary is a given tokenizer's."""

from pathlib import Path

from llama.testing import write_tiny_checkpoint

# Code Llama's infilling pieces, written out here independently of llama.tokenizer.
CODE_LLAMA_PIECES = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
DATA = Path(__file__).resolve().parents[1] / "data"


def train_code_llama_tokenizer(dst: Path, vocab_size: int = 1200, with_mark: bool = True,
                               extra_symbols: tuple = ()) -> Path:
    """A Code Llama-like sentencepiece BPE model trained on the frozen texts in tests/data:
    unk 0, bos 1, eos 2, byte fallback, digits split, no whitespace folding (as Llama's),
    with the infilling pieces as user-defined symbols. with_mark adds "☺" as a piece of its
    own, as Code Llama's vocabulary has it (Meta's encode_infilling relies on it);
    extra_symbols are more pieces of that kind (Code Llama 70B's "<step>")."""
    import io

    import sentencepiece as spm

    text = (DATA / "frozen_code.txt").read_text() + (DATA / "frozen_text.md").read_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", user_defined_symbols=CODE_LLAMA_PIECES + (["☺"] if with_mark else []) + list(extra_symbols),
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(model.getvalue())
    return dst


def write_family_checkpoint(dst: Path, tokenizer: Path, n_shards: int = 1, dtype=None, **params) -> Path:
    """A tiny random checkpoint whose vocabulary is `tokenizer`'s (copied in as tokenizer.model);
    Llama 3 style (the embedding split on the vocabulary) when `dst`'s name says llama3."""
    import shutil

    import torch

    from llama.testing import TINY_PARAMS
    from llama.tokenizer import Tokenizer

    all_params = {**TINY_PARAMS, "vocab_size": Tokenizer(str(tokenizer)).n_words, **params}
    write_tiny_checkpoint(dst, n_shards=n_shards, params=all_params, dtype=dtype or torch.float32,
                          vocab_split_embedding="llama3" in dst.name)
    shutil.copy(tokenizer, dst / "tokenizer.model")
    return dst
