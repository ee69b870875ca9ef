"""Checked reading of the metadata files users hand us (HF config.json,
tokenizer_config.json, special_tokens_map.json, GGUF metadata): every value is checked for
its kind and range where it is read, and a bad one is a LlamaError naming the file and
the field, never a TypeError three calls later."""

import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

from .errors import LlamaError

# Sizes beyond int32 are no real model's and overflow the arithmetic done with them.
MAX_SIZE = 2**31 - 1


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
