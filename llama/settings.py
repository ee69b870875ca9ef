"""Every LLAMA_* environment variable the engine reads, in one registry: name, default,
parser and a one-line doc. Code reads them through get(name), which parses the value each
time it is asked (tests and long-running servers may change the environment); a value that
cannot be parsed is a LlamaError naming the variable and what it takes.

`python -m llama.settings` prints the table that docs/development.md holds (a test keeps
the two equal).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from .errors import LlamaError

# Bounded so that a rank that hangs ends the job instead of leaving the others waiting forever.
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600
DTYPE_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Setting:
    """One variable: `parse(text)` turns its text (or `default` when it is unset or empty)
    into the value code uses; `default` None means the value is None when unset. With
    `empty_is_text`, a variable set to "" is parsed as it is, not taken for unset."""
    name: str
    default: Optional[str]
    parse: Callable[[str], Any]
    doc: str
    empty_is_text: bool = False


def _choices(name: str, choices: Sequence[str], meanings: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise LlamaError(f"{name}={text!r} is not a setting ({meanings}); set one of these or unset it")
        return value
    return parse


def _dist_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_DIST_TIMEOUT_S:  # inf or nan would not be a bound
        raise LlamaError(f"LLAMA_DIST_TIMEOUT={text!r} must be a positive number of seconds, at most "
                         f"{MAX_DIST_TIMEOUT_S} (a week)")
    return value


def check_api_key(key: str, name: str) -> str:
    """The server's API key as given by --api-key or LLAMA_API_KEY (`name`): one rule for both.
    An empty key, or one with spaces around it, is refused: clients send it trimmed, so no
    client could use it. The key itself is never printed."""
    problem = ("is not text" if not isinstance(key, str) else "is empty" if not key
               else "has spaces around it" if key != key.strip()
               else "holds characters a header cannot carry" if not key.isprintable() else None)
    if problem:
        raise LlamaError(f"{name} {problem}: an API key must be non-empty printable text without spaces around "
                         f"it; give another, or leave it out to serve without a key")
    return key


def _dtype(text: str) -> str:
    value = text.strip().lower()
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
    value = names.get(value, value)
    if value not in DTYPE_NAMES:
        raise LlamaError(f"LLAMA_DTYPE={text!r} is not supported; use one of {', '.join(DTYPE_NAMES)} "
                         f"(or unset it for the device's default)")
    return value


SETTINGS: Dict[str, Setting] = {s.name: s for s in [
    Setting("LLAMA_CACHE", "~/.cache/llama-engine", lambda text: Path(text).expanduser(),
            "where fetched wheels, the converted demo model, native builds and measured kernel choices live"),
    Setting("LLAMA_DTYPE", None, _dtype,
            "the model dtype when `Llama.build` gets none (fp32, bf16, fp16); unset: the device's default"),
    Setting("LLAMA_DIST_TIMEOUT", "300", _dist_timeout,
            "seconds any wait between ranks may last before the job ends with an error (at most a week)"),
    Setting("LLAMA_NATIVE", "auto",
            _choices("LLAMA_NATIVE", ("0", "1", "auto"),
                     "0: PyTorch only; 1: the native step wherever it runs; auto: measured"),
            "native CPU kernels: `auto` uses the native decode step where it measured faster, `1` "
            "wherever it runs, `0` never (PyTorch only)"),
    Setting("LLAMA_TUNE", "1", _choices("LLAMA_TUNE", ("0", "1"), "1: measure at first use; 0: never"),
            "`1` measures a matmul shape's kernels at its first use (small weights only), `0` takes the "
            "defaults until `python -m llama.tune` runs"),
    Setting("LLAMA_INTERLEAVE", "1", _choices("LLAMA_INTERLEAVE", ("0", "1"), "1: where measured faster; 0: never"),
            "quantized weights interleaved 16 rows at a time for the AVX-512 kernels: `1` where measured "
            "faster (the default), `0` kept in GGML's block order"),
    Setting("LLAMA_KV_CACHE", "auto",
            _choices("LLAMA_KV_CACHE", ("auto", "fp32", "bf16"), "auto: fp32 on the CPU, the model's dtype elsewhere"),
            "the dtype the KV cache is kept in: `bf16` halves its memory and what a long-context decode step "
            "reads (accuracy in docs/native-kernels.md), `fp32`; `auto`: fp32 on the CPU, the model's dtype "
            "elsewhere"),
    Setting("LLAMA_PROGRESS", None, _choices("LLAMA_PROGRESS", ("0", "1"), "1: always; 0: never"),
            "progress bars on stderr: `1` always, `0` never; unset: when stderr is a terminal (rank 0 only)"),
    Setting("LLAMA_API_KEY", None, lambda text: check_api_key(text, "LLAMA_API_KEY"),
            "the key `python -m llama.serve` requires (`Authorization: Bearer KEY`) when `--api-key` is not "
            "given; set but empty is refused, as `--api-key ''` is", empty_is_text=True),
]}


def get(name: str) -> Any:
    """The parsed value of the setting `name` now (LlamaError if its text cannot be parsed)."""
    setting = SETTINGS[name]
    text = os.environ.get(name)
    if text is not None and setting.empty_is_text:
        return setting.parse(text)
    if text is None or not text.strip():
        if setting.default is None:
            return None
        text = setting.default
    return setting.parse(text)


def markdown_table() -> str:
    """The settings as the markdown table of docs/development.md."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {'`' + s.default + '`' if s.default is not None else 'unset'} | {s.doc} |"
             for s in SETTINGS.values()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:]:  # --help, or anything: what this command does
        print("usage: python -m llama.settings\n\nPrints every LLAMA_* variable the engine reads (name, default, "
              "what it does) as a markdown table.")
    else:
        print(markdown_table(), end="")
