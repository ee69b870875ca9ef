"""The one validation vocabulary: what a value a user gave us must be, and the LlamaError
that names it when it is not. The API, the command lines, the server and the readers of
JSON and GGUF metadata all check through these, so the same mistake gets the same words.

- Arguments: whole_number, real_number, one_of_choices, flag: `name=value must be ...`.
- Text: check_text: valid Unicode or a LlamaError naming where and at which character
  (Python strings can hold lone surrogates, from a JSON escape such as "\\ud800" or from
  bytes that were not UTF-8, which tokenizers cannot encode; they are never repaired
  silently, since the model would then answer something other than what was written).
- Metadata files: field(obj, key, Kind, file) and read_json_object(path): a bad value is a
  LlamaError naming the file and the field, never a TypeError three calls later.
"""

import json
import math
import numbers
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

from ..errors import LlamaError

# Sizes beyond int32 are no real model's and overflow the arithmetic done with them.
MAX_SIZE = 2**31 - 1


# ---- arguments -----------------------------------------------------------------------------

def _shown(value: Any) -> str:
    """A value as messages show it: numpy scalars as the plain numbers they hold, cut at 80."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _limits(low: Optional[float], high: Optional[float]) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def whole_number(value: Any, name: str, low: Optional[int] = None, high: Optional[int] = None,
                 optional: bool = False) -> Optional[int]:
    """`value` as an int when it is an integer (numpy's too; never a bool) within [low, high];
    None when it is None and `optional`; else a LlamaError "name=value must be an integer ..."."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (low is not None and value < low) or (high is not None and value > high):
        raise LlamaError(f"{name}={_shown(value)} must be an integer{_limits(low, high)}"
                         f"{' (or left out)' if optional else ''}")
    return int(value)


def real_number(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
                optional: bool = False, above: bool = False, hint: str = "") -> Optional[float]:
    """`value` as a finite float within [low, high] ((low, high] with `above`); None when it
    is None and `optional`; else a LlamaError naming it. `hint` ends the message."""
    if value is None and optional:
        return None
    number = None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    below = low is not None and number is not None and (number <= low if above else number < low)
    bad = number is None or not math.isfinite(number) or below or (high is not None and number > high)
    if bad:
        if above and low is not None:
            limits = f" in ({low}, {high}]" if high is not None else f" > {low}"
        else:
            limits = _limits(low, high)
        raise LlamaError(f"{name}={_shown(value)} must be a finite number{limits}{hint}"
                         f"{' (or left out)' if optional else ''}")
    return number


def one_of_choices(value: Any, choices: Sequence[Any], name: str, optional: bool = False) -> Any:
    """`value` if it is one of `choices` (or None and `optional`); else a LlamaError listing them."""
    if (value is None and optional) or value in choices:
        return value
    listed = ", ".join(str(c) for c in choices)
    raise LlamaError(f"{name}={_shown(value)} must be one of {listed}{' (or left out)' if optional else ''}")


def flag(value: Any, name: str, optional: bool = False) -> Optional[bool]:
    """`value` if it is True or False (None when absent and `optional`); else a LlamaError."""
    if (value is None and optional) or isinstance(value, bool):
        return value
    raise LlamaError(f"{name}={_shown(value)} must be true or false{' (or left out)' if optional else ''}")


def token_ids(tokens: Any, vocab_size: int, where: str) -> list:
    """A prompt's token ids as a list of ints, each in [0, vocab_size); else a LlamaError
    naming `where`."""
    if not isinstance(tokens, (list, tuple)) or len(tokens) == 0:
        raise LlamaError(f"{where} is empty or not a list of token ids; give at least one token")
    bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size]
    if bad:
        raise LlamaError(f"{where} holds token ids outside [0, {vocab_size}): {[_shown(t) for t in bad[:5]]}")
    return [int(t) for t in tokens]


# ---- text ------------------------------------------------------------------------------------
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


# ---- metadata files ------------------------------------------------------------------------


class Kind(NamedTuple):
    """What a field must hold: a description for messages and a test."""
    name: str
    test: Callable[[Any], bool]


INT = Kind("an integer", lambda v: type(v) is int)
POSITIVE_INT = Kind(f"an integer from 1 to {MAX_SIZE}", lambda v: type(v) is int and 1 <= v <= MAX_SIZE)
POSITIVE_NUMBER = Kind("a positive finite number", lambda v: type(v) in (int, float) and 0 < v < math.inf)
STRING = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: type(v) is bool)
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))


def list_of(kind: Kind) -> Kind:
    return Kind(f"a list of {kind.name}s", lambda v: isinstance(v, list) and all(kind.test(x) for x in v))


def one_of(*kinds: Kind) -> Kind:
    return Kind(" or ".join(k.name for k in kinds), lambda v: any(k.test(v) for k in kinds))


_REQUIRED = object()


def field(obj: dict, key: str, kind: Kind, where: Union[str, Path], default: Any = _REQUIRED,
          name: Optional[str] = None) -> Any:
    """obj[key], checked to be of `kind`; `default` if the key is absent or null. LlamaError
    naming the file `where` and the field (`name`, e.g. "rope_scaling.factor", else `key`)
    if the value is of the wrong kind, or absent and required."""
    name = name or key
    value = obj.get(key)
    if value is None:
        if default is _REQUIRED:
            raise LlamaError(f"{str(where)!r} lacks the field {name!r}; restore the file from the download")
        return default
    if not kind.test(value):
        raise LlamaError(f"{str(where)!r}: {name} = {_short(value)} is invalid, it must be {kind.name}; "
                         f"fix it or restore the file from the download")
    return value


def read_json_object(path: Union[str, Path]) -> dict:
    """The JSON object in `path`; LlamaError naming the file if it is unreadable, not JSON,
    or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise LlamaError(f"cannot read {str(path)!r} ({type(exc).__name__}: {exc}); it must be a JSON "
                         f"object: fix it or restore it from the download") from None
    if not isinstance(value, dict):
        raise LlamaError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object; "
                         f"fix it or restore it from the download")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
