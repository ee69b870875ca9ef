"""python -m llama.convert SRC DST: an HF model directory or a GGUF file into Meta's checkpoint
layout (llama.checkpoint.convert does the work)."""

from .checkpoint.convert import MARKER, convert
from .cli import path_flags, run

__all__ = ["convert", "MARKER", "main"]


@path_flags("src", "dst")
def main(src: str, dst: str, model_parallel_size: int = 1, dtype: str = "bf16", force: bool = False) -> None:
    """Convert an HF model directory or a GGUF file into Meta's checkpoint layout.

    Args:
        src: HF model directory (config.json + safetensors + tokenizer) or a .gguf file.
        dst: output directory (must not exist or be empty, unless --force).
        model_parallel_size: number of consolidated.NN.pth shards to write.
        dtype: bf16, fp16 or fp32.
        force: replace an earlier output of llama.convert at dst (never other files).
    """
    out = convert(src, dst, model_parallel_size, dtype, force)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
