"""Dialog types and chat prompt formats: a dialog becomes the token ids of one prompt."""

from typing import List, Literal, Sequence, TypedDict

from .errors import LlamaError
from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]


def check_dialog(dialog: Sequence[Message], index: int = 0) -> None:
    """Structure every format needs: an optional system message, then user and assistant
    turns alternating, ending with the user. `index` names the dialog in messages."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise LlamaError(f"{where} is empty or not a list of messages; give at least one "
                         f"{{'role': 'user', 'content': ...}} message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise LlamaError(f"{where}, message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise LlamaError(f"{where}, message {i} has unknown role {msg['role']!r}; "
                             f"use 'system', 'user' or 'assistant'")
        if not isinstance(msg["content"], str):
            raise LlamaError(f"{where}, message {i}: content must be a str, got {type(msg['content']).__name__}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            offset = len(dialog) - len(turns)
            raise LlamaError(f"{where}, message {i + offset} has role {msg['role']!r} where "
                             f"{expected!r} was expected: after an optional system message, "
                             f"turns must alternate user/assistant and end with user")
    if not turns or turns[-1]["role"] != "user":
        raise LlamaError(f"{where} must end with a 'user' message for the model to answer")


class Llama2ChatFormat:
    """Meta's Llama 2 chat format: each exchange is `[INST] user [/INST] answer ` between
    BOS and EOS; the system prompt is merged into the first user turn in a <<SYS>> block."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
    UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def stop_tokens(self) -> frozenset:
        return frozenset({self.tokenizer.eos_id})

    def is_unsafe(self, dialog: Sequence[Message]) -> bool:
        """True if any message contains the format's control tags (Meta refuses these)."""
        return any(tag in msg["content"] for msg in dialog for tag in self.SPECIAL_TAGS)

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> List[int]:
        check_dialog(dialog)
        if dialog[0]["role"] == "system":
            merged = self.B_SYS + dialog[0]["content"] + self.E_SYS + dialog[1]["content"]
            dialog = [{"role": "user", "content": merged}, *dialog[2:]]
        tokens: List[int] = []
        for user, answer in zip(dialog[0::2], dialog[1::2]):
            text = f"{self.B_INST} {user['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        last = dialog[-1]["content"].strip()
        tokens += self.tokenizer.encode(f"{self.B_INST} {last} {self.E_INST}", bos=True, eos=False)
        return tokens


ChatFormat = Llama2ChatFormat
