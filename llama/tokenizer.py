"""Tokenizers with Meta's interface: encode(s, bos, eos), decode, bos_id, eos_id, pad_id,
n_words, plus stop_tokens (the ids that end a generation), special_tokens (control-token
text -> id) and add_bos (whether this model's prompts start with BOS).

`Tokenizer(path)` looks at the file and returns the matching kind:
  - SentencePieceTokenizer: Llama 1/2 `tokenizer.model` (a sentencepiece protobuf);
  - TiktokenTokenizer: Llama 3 `tokenizer.model` (lines of `base64token rank`);
  - HFTokenizer: an HF `tokenizer.json` (e.g. SmolLM2's byte-level BPE).

Every kind's `encode` takes `allow_special`: False encodes control-token text such as
"<|eot_id|>" as plain text, True turns it into the control token. The default follows each
reference: plain text for tiktoken (Meta), control tokens for HF tokenizer.json (HF).
"""

import os
import re
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Optional, Sequence, Union

from .errors import LlamaError
from .utils.checks import BOOL, STRING, Kind, check_text, field, one_of, read_json_object

# Special tokens that end a generation whenever a vocabulary has them (Llama 3's, ChatML's).
END_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


class Tokenizer:
    """Base class; `Tokenizer(path)` (as Meta's scripts call it) returns the kind of tokenizer
    the file holds, as load_tokenizer does. `path` may also be a directory holding
    tokenizer.model or tokenizer.json."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool = True  # the model's own policy for plain text prompts
    special_tokens: Dict[str, int]  # control-token text -> id

    def __new__(cls, model_path: str, *args, **kwargs) -> "Tokenizer":
        # Only picks the class: Python then runs that class's __init__, once.
        return super().__new__(tokenizer_class(model_path) if cls is Tokenizer else cls)

    @property
    def stop_tokens(self) -> AbstractSet[int]:
        """The ids that end a generation: eos, and every end marker the vocabulary holds as a
        special token (<|eot_id|>, <|im_end|>, ...)."""
        return frozenset({self.eos_id} | {self.special_tokens[t] for t in END_MARKERS if t in self.special_tokens})

    def encode(self, s: str, bos: bool, eos: bool, allow_special: bool = False) -> List[int]:
        raise NotImplementedError

    def decode(self, t: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, t: int) -> bytes:
        """The bytes token `t` stands for (part of a character, for a byte token), as
        OpenAI's logprobs report them."""
        raise NotImplementedError


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback pieces


def _gpt2_byte_chars() -> Dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is written as one printable character,
    itself where it is printable Latin-1, else 256 + its rank among the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _piece_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece's bytes: a byte piece's byte, else its text with ▁ as a space."""
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")


def _resolve_path(model_path: Union[str, os.PathLike]) -> str:
    """The tokenizer file itself: `model_path`, or tokenizer.model / tokenizer.json inside it."""
    if not isinstance(model_path, (str, os.PathLike)):
        raise LlamaError(f"tokenizer path must be a file or directory name, got {model_path!r}")
    path = os.fspath(model_path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise LlamaError(f"no tokenizer.model or tokenizer.json in {path!r}; pass --tokenizer_path "
                         f"pointing at the model's tokenizer file")
    if not os.path.isfile(path):
        raise LlamaError(f"tokenizer file not found: {path!r}; pass --tokenizer_path pointing at "
                         f"the model's tokenizer.model or tokenizer.json")
    return path


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+(\r?\n|$)")


def _sniff_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip()[:1] == b"{":
        return "hf"
    if _TIKTOKEN_LINE.match(head):
        return "tiktoken"
    # A sentencepiece model is a protobuf whose first field (the piece list) has tag 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise LlamaError(f"{path!r} is not a tokenizer this engine can read; expected a sentencepiece "
                     f"tokenizer.model (Llama 1/2), a tiktoken tokenizer.model (Llama 3) or an HF "
                     f"tokenizer.json")


# Code Llama's infilling pieces: prefix, suffix, middle, end of the infilled text.
INFILLING_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
# Put before text to encode it without sentencepiece's implicit leading space, and cut off
# again, as Meta's codellama does: a character that merges with nothing around it.
_NO_SPACE_MARK = "☺"


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 and Code Llama sentencepiece tokenizer. Text never becomes control tokens.

    As Meta's codellama Tokenizer: prefix_id, suffix_id, middle_id and eot_id are the ids of
    Code Llama's infilling pieces, step_id that of Code Llama 70B's <step>, each None where
    the vocabulary lacks it (Llama 1/2)."""

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        model_path = _resolve_path(model_path)
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as exc:
            raise LlamaError(f"cannot read sentencepiece tokenizer {model_path!r}: {exc}") from None
        self.model_path = model_path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.add_bos = True
        self.special_tokens = {self.sp_model.id_to_piece(i): i for i in range(self.n_words)
                               if self.sp_model.is_control(i)}
        self.prefix_id, self.suffix_id, self.middle_id, self.eot_id = map(self._piece_id, INFILLING_PIECES)
        self.step_id = self._piece_id("<step>")  # Code Llama 70B's end of a dialog turn
        self._mark_ids = self.sp_model.encode(_NO_SPACE_MARK)  # e.g. ["▁", "☺"]

    def _piece_id(self, piece: str) -> Optional[int]:
        """The id of `piece`, None if the vocabulary lacks it (sentencepiece answers unk)."""
        i = self.sp_model.piece_to_id(piece)
        return i if self.sp_model.id_to_piece(i) == piece else None

    def encode(self, s: str, bos: bool, eos: bool, allow_special: bool = False) -> List[int]:
        check_text(s, "the text to encode")
        t = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(list(t))

    def token_piece(self, t: int) -> str:
        """The vocabulary's piece for id `t` (e.g. "▁def"), as Meta's codellama reports tokens."""
        return self.sp_model.id_to_piece(t)

    def token_bytes(self, t: int) -> bytes:
        return _piece_bytes(self.sp_model.id_to_piece(t))

    def encode_infilling(self, s: str) -> List[int]:
        """`s` encoded without the implicit leading space (Code Llama's infilling suffix)."""
        check_text(s, "the text to encode")
        t = self.sp_model.encode(_NO_SPACE_MARK + s)
        if t[:len(self._mark_ids)] != self._mark_ids:  # a vocabulary that merges the mark with s
            raise LlamaError(f"cannot encode {s[:20]!r}... without a leading space with tokenizer "
                             f"{self.model_path!r}: its vocabulary joins {_NO_SPACE_MARK!r} to that text")
        return t[len(self._mark_ids):]

    def decode_infilling(self, t: Sequence[int]) -> str:
        """Decode without dropping a leading space (the inverse of encode_infilling)."""
        return self.sp_model.decode(self._mark_ids + list(t))[len(_NO_SPACE_MARK):]


# ---- Llama 3: tiktoken ----------------------------------------------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 12)]

# tiktoken panics beyond about 400k characters, and is quadratic on long runs of
# whitespace or non-whitespace (openai/tiktoken#195): Meta cuts its input at these limits.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_for_tiktoken(s: str) -> Iterator[str]:
    """Pieces of `s` cut where Meta's reference cuts: every 400k characters, then inside each
    run of whitespace or non-whitespace longer than 25k, every 25k characters of the run."""
    for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        window = s[start:start + TIKTOKEN_MAX_ENCODE_CHARS]
        cuts = [run.start() + k for run in re.finditer(r"\s+|\S+", window)
                for k in range(MAX_NO_WHITESPACES_CHARS, len(run.group()), MAX_NO_WHITESPACES_CHARS)]
        for a, b in zip([0] + cuts, cuts + [len(window)]):
            yield window[a:b]


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken BPE ranks plus 256 special tokens after them.
    Ids, pad_id and stop tokens follow Meta's llama_models reference."""

    def __init__(self, model_path: str):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        model_path = _resolve_path(model_path)
        try:
            ranks = load_tiktoken_bpe(model_path)
        except Exception as exc:  # a bad line raises ValueError or binascii.Error
            raise LlamaError(f"cannot read tiktoken tokenizer {model_path!r}: {exc}") from None
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=LLAMA3_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words: int = len(ranks) + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.add_bos = True

    def encode(self, s: str, bos: bool, eos: bool, allow_special: bool = False,
               allowed_special: Union[Literal["all"], AbstractSet[str], None] = None,
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """As Meta's: by default special-token text is encoded as plain text.
        allow_special=True (or allowed_special="all") makes it control tokens."""
        check_text(s, "the text to encode")
        allowed = "all" if allow_special else (allowed_special or set())
        t = [i for piece in _split_for_tiktoken(s) for i in
             self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special)]
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))

    def token_bytes(self, t: int) -> bytes:
        return self.model.decode_single_token_bytes(t)


# ---- HF tokenizer.json ----------------------------------------------------------------

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|im_start|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")


# A special token is written as its text, or as an AddedToken object {"content": text, ...}.
_TOKEN_TEXT = one_of(STRING, Kind('an object {"content": "..."}',
                                  lambda v: isinstance(v, dict) and isinstance(v.get("content"), str)))


def _read_token_config(directory: str) -> dict:
    """Keys bos_token, eos_token, pad_token (token text) and add_bos_token (bool) from
    tokenizer_config.json, falling back to special_tokens_map.json, beside the tokenizer.
    A value of the wrong kind is a LlamaError naming the file and the key."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        data = read_json_object(path)
        for key in ("bos_token", "eos_token", "pad_token"):
            value = field(data, key, _TOKEN_TEXT, path, None)
            if value is not None:
                config[key] = value["content"] if isinstance(value, dict) else value
        add_bos = field(data, "add_bos_token", BOOL, path, None)
        if add_bos is not None:
            config["add_bos_token"] = add_bos
    return config


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json`, run by the `tokenizers` library.

    bos/eos/pad come from the arguments, else from tokenizer_config.json or
    special_tokens_map.json beside the file (keys "bos_token", "eos_token", "pad_token":
    the token text, or {"content": text}; "add_bos_token": bool), else from well-known
    special-token names. add_bos defaults to whether the file's post-processor adds BOS.
    """

    def __init__(self, model_path: str, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, add_bos: Optional[bool] = None):
        import tokenizers

        model_path = _resolve_path(model_path)
        try:
            self.model = tokenizers.Tokenizer.from_file(model_path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise LlamaError(f"cannot read HF tokenizer {model_path!r}: {exc}") from None
        self.plain_model = tokenizers.Tokenizer.from_str(self.model.to_str())
        self.plain_model.encode_special_tokens = True  # control-token text stays text
        self.special_tokens = {t.content: i for i, t in self.model.get_added_tokens_decoder().items()
                               if t.special}
        self.n_words: int = self.model.get_vocab_size(with_added_tokens=True)
        config = _read_token_config(os.path.dirname(os.path.abspath(model_path)))

        def token_id(given: Optional[str], key: str, names: Sequence[str]) -> Optional[int]:
            text = given or config.get(key) or next((n for n in names if n in self.special_tokens), None)
            if text is None:
                return None
            if self.model.token_to_id(text) is None:
                raise LlamaError(f"{key} {text!r} (for {model_path!r}) is not in the vocabulary; "
                                 f"fix {key} in tokenizer_config.json")
            return self.model.token_to_id(text)

        eos = token_id(eos_token, "eos_token", _EOS_NAMES)
        if eos is None:
            raise LlamaError(f"cannot tell the end-of-sequence token of {model_path!r}; write a "
                             f'tokenizer_config.json beside it with {{"eos_token": "..."}}')
        self.eos_id: int = eos
        bos = token_id(bos_token, "bos_token", _BOS_NAMES)
        self.bos_id: int = eos if bos is None else bos  # GPT-2 style: one token for both
        pad = token_id(pad_token, "pad_token", ())
        self.pad_id: int = -1 if pad is None else pad
        if add_bos is None:
            add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and self.model.encode("", add_special_tokens=True).ids[:1] == [bos]
        self.add_bos = bool(add_bos)

    def encode(self, s: str, bos: bool, eos: bool, allow_special: bool = True) -> List[int]:
        """As HF: by default special-token text becomes the control token; allow_special=False
        encodes it as plain text."""
        check_text(s, "the text to encode")
        t = (self.model if allow_special else self.plain_model).encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t), skip_special_tokens=False)

    def token_bytes(self, t: int) -> bytes:
        import tokenizers

        piece = self.model.id_to_token(t) or ""
        if isinstance(self.model.decoder, tokenizers.decoders.ByteLevel):  # GPT-2's byte alphabet
            alphabet = _gpt2_byte_chars()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        return _piece_bytes(piece)


_KINDS = {"sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer, "hf": HFTokenizer}


def tokenizer_class(model_path: Union[str, os.PathLike]) -> type:
    """The Tokenizer subclass that reads `model_path` (a file, or a directory holding one)."""
    return _KINDS[_sniff_kind(_resolve_path(model_path))]


def load_tokenizer(model_path: Union[str, os.PathLike]) -> Tokenizer:
    """The tokenizer in `model_path` (a file, or a directory holding tokenizer.model or
    tokenizer.json), of the kind the file holds. Same as Tokenizer(model_path)."""
    return tokenizer_class(model_path)(model_path)


def __getattr__(name: str):
    """`from llama.tokenizer import ChatFormat`, as Meta's Llama 3 code writes it. Chat formats
    use tokenizers, not the reverse, so this module imports chat_format only when asked."""
    if name == "ChatFormat":
        from .chat_format import ChatFormat

        return ChatFormat
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
