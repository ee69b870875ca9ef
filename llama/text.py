"""The one policy for text a user gives us (prompts, dialog contents, batch lines, the
chat REPL, system prompts): it must be valid Unicode. Text that is not, is refused with
a LlamaError naming where and at which character; it is never repaired silently, since
the model would then answer something other than what was written.

Python strings can hold what no UTF-8 text can: lone surrogates, from a JSON escape such
as "\\ud800" or from bytes that were not UTF-8 (Python keeps byte 0xE9 of a Latin-1
terminal as the surrogate U+DCE9). Tokenizers cannot encode them.
"""

from .errors import LlamaError


def check_text(value: object, where: str) -> str:
    """`value` if it is a str of valid Unicode; LlamaError naming `where` otherwise."""
    if not isinstance(value, str):
        raise LlamaError(f"{where} must be text (str), got {type(value).__name__}: {value!r:.80}")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LlamaError(f"{where} is not valid Unicode text: {_describe(value, exc.start)}") from None
    return value


def _describe(text: str, index: int) -> str:
    code = ord(text[index])
    context = repr(text[max(0, index - 10): index + 10])
    if 0xDC80 <= code <= 0xDCFF:  # how Python keeps a byte that did not decode as UTF-8
        return (f"byte 0x{code - 0xDC00:02X} at character {index} (in {context}) is not UTF-8; "
                f"set the terminal or file to UTF-8 and enter it again")
    return (f"a lone surrogate U+{code:04X} at character {index} (in {context}), half of a UTF-16 pair "
            f"with no other half; remove it or write the whole character")
