"""Shared plumbing for the command-line scripts: user mistakes become one line on
stderr and exit status 1, never a traceback."""

import sys
from typing import Callable

import fire

from .errors import LlamaError


def run(main: Callable) -> None:
    """fire.Fire(main), turning LlamaError (and a missing file) into a one-line error."""
    try:
        fire.Fire(main)
    except LlamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
