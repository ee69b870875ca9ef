"""Dialog types and chat prompt formats: a dialog becomes the token ids of one prompt.

Formats: Llama2ChatFormat ([INST]), Llama3ChatFormat (header ids, and Llama 3.1's tool
calling: llama.tool_calls), ChatMLFormat (<|im_start|>). `ChatFormat(tokenizer)` and
`make_chat_format(tokenizer, name)` pick one.
"""

import datetime
from typing import Any, AbstractSet, Dict, List, Literal, Optional, Sequence, TypedDict

from . import tool_calls
from .errors import LlamaError
from .tokenizer import Tokenizer
from .utils.checks import check_text

Role = Literal["system", "user", "assistant", "tool", "ipython"]


class Message(TypedDict):
    role: Role
    content: str
    # An assistant message may also hold "tool_calls": [{"call_id", "tool_name", "arguments"}]
    # (the calls it made, llama-models' ToolCall; its content may then be None or "").


Dialog = List[Message]

# Every role some format takes. Llama 3 writes "tool" (Meta's llama_models name) as the
# "ipython" header (its prompt format's name), and takes "ipython" itself too.
ROLES = ("system", "user", "assistant", "tool", "ipython")


def check_messages(dialog: Sequence[Message], index: int = 0, roles: Sequence[str] = ROLES) -> None:
    """What every format needs: a non-empty list of {'role', 'content'} messages, each role
    one of `roles`, each content valid text. The order of the roles is each format's
    (ChatFormat.check_dialog). `index` names the dialog in messages."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise LlamaError(f"{where} is empty or not a list of messages; give at least one "
                         f"{{'role': 'user', 'content': ...}} message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise LlamaError(f"{where}, message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in roles:
            raise LlamaError(f"{where}, message {i} has unknown role {msg['role']!r}: this chat format "
                             f"takes {', '.join(map(repr, roles))}")
        calls = msg.get("tool_calls")
        if calls is not None:
            _check_calls(calls, msg["role"], f"{where}, message {i}")
        if msg["content"] is not None or not calls:  # a message of calls alone may have no content
            check_text(msg["content"], f"{where}, message {i}: content")


def _check_calls(calls: Any, role: str, where: str) -> None:
    if role != "assistant":
        raise LlamaError(f"{where} has tool_calls, which only an 'assistant' message can have")
    if not isinstance(calls, (list, tuple)) or not all(
            isinstance(c, dict) and isinstance(c.get("tool_name"), str) and isinstance(c.get("arguments"), dict)
            for c in calls):
        raise LlamaError(f"{where}: tool_calls must be a list of {{'call_id', 'tool_name', 'arguments': {{...}}}} "
                         f"(llama-models' ToolCall), got {calls!r:.80}")


class ChatFormat:
    """Base of the chat formats, and Meta's entry point: `ChatFormat(tokenizer)` returns the
    format the tokenizer's vocabulary implies. To choose by name, call make_chat_format."""

    UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
    ROLES: Sequence[str] = ROLES  # the roles this format takes

    def __new__(cls, tokenizer: Tokenizer, *args, **kwargs) -> "ChatFormat":
        # Only picks the class: Python then runs that class's __init__, once.
        chosen = CHAT_FORMATS[infer_chat_format_name(tokenizer)] if cls is ChatFormat else cls
        return super().__new__(chosen)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def stop_tokens(self) -> AbstractSet[int]:
        """Ids that end the assistant's answer: the tokenizer's stop tokens (eos and the end
        markers its vocabulary holds: <|eot_id|>, <|im_end|>, ...)."""
        return self.tokenizer.stop_tokens

    def check_dialog(self, dialog: Sequence[Message], index: int = 0) -> None:
        """LlamaError unless this format can encode `dialog`. Meta's Llama 3 code (and
        SmolLM2's ChatML template) take messages in any order: several user turns in a row,
        a system message anywhere, a dialog ending with the assistant's message (a new
        assistant message follows it). `index` names the dialog in messages."""
        check_messages(dialog, index, self.ROLES)

    def is_unsafe(self, dialog: Sequence[Message]) -> bool:
        """True if the dialog must be refused (answered with UNSAFE_ERROR) instead of run."""
        return False

    def encode_dialog_prompt(self, dialog: Sequence[Message], tools: Optional[Sequence[Dict[str, Any]]] = None,
                             tool_choice: tool_calls.ToolChoice = "auto",
                             today: Optional[datetime.date] = None) -> List[int]:
        """Token ids of the prompt asking the assistant to answer `dialog`, offering `tools`
        (llama.tool_calls; the Llama 3 format only) as tool_choice says; `today` is the date
        a tool prompt states (default: today)."""
        raise NotImplementedError

    def _no_tools(self, dialog: Sequence[Message], tools: Optional[Sequence[Dict[str, Any]]]) -> None:
        """LlamaError if `dialog` holds tool calls or tools are offered: this format has no tool calling."""
        if tools or any(msg.get("tool_calls") for msg in dialog):
            raise LlamaError(f"tool calling needs a Llama 3.1 model (the llama3 chat format); this model's chat "
                             f"format is {type(self).__name__}")

    def _special(self, text: str) -> int:
        """The id of control token `text`; LlamaError if the vocabulary lacks it."""
        special = getattr(self.tokenizer, "special_tokens", {})
        if text not in special:
            raise LlamaError(f"the {type(self).__name__} chat format needs the control token {text!r}, "
                             f"which this tokenizer lacks; choose the chat format that matches the model "
                             f"(params.json key 'chat_format': llama2, llama3 or chatml)")
        return special[text]

    def _text(self, s: str) -> List[int]:
        """`s` as plain text: control-token text in it never becomes a control token."""
        return self.tokenizer.encode(s, bos=False, eos=False, allow_special=False)


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 chat format: each exchange is `[INST] user [/INST] answer ` between
    BOS and EOS; the system prompt is merged into the first user turn in a <<SYS>> block."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
    ROLES = ("system", "user", "assistant")

    def check_dialog(self, dialog: Sequence[Message], index: int = 0) -> None:
        """Meta's Llama 2 rules: an optional system message, then user and assistant turns
        alternating, ending with the user."""
        if getattr(self.tokenizer, "step_id", None) is not None:
            # Meta's codellama answers such a model with its "Source: ... <step>" format instead.
            raise LlamaError(f"tokenizer {getattr(self.tokenizer, 'model_path', '')!r} has Code Llama 70B's "
                             f"<step> piece, whose chat format (Source: ... <step>) this engine does not "
                             f"implement; the Llama 2 format would give that model a prompt it was not trained "
                             f"on. Build the prompt yourself and use generate(..., stop_tokens=[tokenizer.step_id])")
        check_messages(dialog, index, self.ROLES)
        turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
        for i, msg in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != expected:
                offset = len(dialog) - len(turns)
                raise LlamaError(f"dialog {index}, message {i + offset} has role {msg['role']!r} where "
                                 f"{expected!r} was expected: in the Llama 2 chat format, after an optional "
                                 f"system message, turns must alternate user/assistant and end with user")
        if not turns or turns[-1]["role"] != "user":
            raise LlamaError(f"dialog {index} must end with a 'user' message for the model to answer "
                             f"(the Llama 2 chat format)")

    def is_unsafe(self, dialog: Sequence[Message]) -> bool:
        """True if any message contains the format's control tags (Meta refuses these)."""
        return any(tag in (msg["content"] or "") for msg in dialog for tag in self.SPECIAL_TAGS)

    def encode_dialog_prompt(self, dialog: Sequence[Message], tools=None, tool_choice="auto", today=None) -> List[int]:
        self.check_dialog(dialog)
        self._no_tools(dialog, tools)
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


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 chat format: <|begin_of_text|>, then per message
    `<|start_header_id|>role<|end_header_id|>\\n\\n` + stripped content + `<|eot_id|>`, then an
    open assistant header. Messages come in any order and role "tool" is written "ipython",
    as in Meta's llama_models. Content is encoded as plain text, so text such as "<|eot_id|>"
    cannot inject control tokens; is_unsafe is therefore always False.

    Llama 3.1's tool calling (llama.tool_calls): an assistant message's tool calls follow its
    content as JSON and end with <|eom_id|>, as llama-models writes them; with tools offered,
    the system message becomes the tool environment's (the dialog's own system message kept
    in it) and a user message listing the tools comes before the rest of the dialog; with
    tool_choice "required" or a named function, the prompt ends with the start of the call."""

    def _header(self, role: str) -> List[int]:
        role = "ipython" if role == "tool" else role
        return ([self._special("<|start_header_id|>")] + self._text(role)
                + [self._special("<|end_header_id|>")] + self._text("\n\n"))

    def encode_dialog_prompt(self, dialog: Sequence[Message], tools=None, tool_choice="auto", today=None) -> List[int]:
        self.check_dialog(dialog)
        tokens = [self._special("<|begin_of_text|>")]
        if tools and tool_choice != "none":
            # The tool environment's messages, written as Meta's templates make them (not stripped).
            system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
            for role, text in (("system", tool_calls.system_message(system, today)),
                               ("user", tool_calls.tools_message(tools))):
                tokens += self._header(role) + self._text(text) + [self._special("<|eot_id|>")]
            dialog = dialog[1:] if system is not None else dialog
        for msg in dialog:
            tokens += self._header(msg["role"]) + self._text((msg["content"] or "").strip())
            calls = msg.get("tool_calls") or []
            for call in calls:
                tokens += self._text(tool_calls.call_text(call))
            tokens.append(self._special("<|eom_id|>" if calls else "<|eot_id|>"))
        tokens += self._header("assistant")
        prefix = tool_calls.call_prefix(tool_choice) if tools else ""
        if prefix.startswith(tool_calls.PYTHON_TAG):
            tokens += [self._special(tool_calls.PYTHON_TAG)] + self._text(prefix[len(tool_calls.PYTHON_TAG):])
        return tokens


class ChatMLFormat(ChatFormat):
    """ChatML as in SmolLM2's HF chat template: per message, in any order, `<|im_start|>role\\n`
    + content (not stripped) + `<|im_end|>\\n`, then `<|im_start|>assistant\\n`. With a
    default_system_prompt, a dialog without a system message gets one first. Text between
    control tokens is encoded in one piece, as HF does, but as plain text: "<|im_end|>" in
    content cannot inject a control token (HF's template would), so is_unsafe is always False."""

    def __init__(self, tokenizer: Tokenizer, default_system_prompt: Optional[str] = None):
        super().__init__(tokenizer)
        if default_system_prompt is not None:
            check_text(default_system_prompt, "the default system prompt (params.json key 'default_system_prompt')")
        self.default_system_prompt = default_system_prompt
        self.im_start, self.im_end = self._special("<|im_start|>"), self._special("<|im_end|>")

    def encode_dialog_prompt(self, dialog: Sequence[Message], tools=None, tool_choice="auto", today=None) -> List[int]:
        self.check_dialog(dialog)
        self._no_tools(dialog, tools)
        if self.default_system_prompt is not None and dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": self.default_system_prompt}, *dialog]
        tokens: List[int] = []
        for msg in dialog:
            tokens += [self.im_start] + self._text(f"{msg['role']}\n{msg['content']}")
            tokens += [self.im_end] + self._text("\n")
        return tokens + [self.im_start] + self._text("assistant\n")


CHAT_FORMATS = {"llama2": Llama2ChatFormat, "llama3": Llama3ChatFormat, "chatml": ChatMLFormat}


def infer_chat_format_name(tokenizer: Tokenizer) -> str:
    """"llama3" if the vocabulary has <|start_header_id|>, "chatml" if it has <|im_start|>,
    else "llama2"."""
    special = getattr(tokenizer, "special_tokens", {})
    if "<|start_header_id|>" in special and "<|eot_id|>" in special:
        return "llama3"
    if "<|im_start|>" in special and "<|im_end|>" in special:
        return "chatml"
    return "llama2"


def make_chat_format(tokenizer: Tokenizer, name: Optional[str] = None,
                     default_system_prompt: Optional[str] = None, where: str = "make_chat_format") -> ChatFormat:
    """The chat format `name` ("llama2", "llama3", "chatml"; params.json key "chat_format"),
    or the one the tokenizer implies when name is None. default_system_prompt applies to
    ChatML only (SmolLM2's template inserts one when the dialog has no system message).
    `where` (e.g. the params.json path) names the source of the settings in errors."""
    if name is not None and name not in CHAT_FORMATS:
        raise LlamaError(f"{where!r}: chat_format={name!r} is invalid, it must be one of "
                         f"{', '.join(CHAT_FORMATS)}; fix it or restore the file from the download")
    name = name or infer_chat_format_name(tokenizer)
    if name == "chatml":
        return ChatMLFormat(tokenizer, default_system_prompt)
    return CHAT_FORMATS[name](tokenizer)
