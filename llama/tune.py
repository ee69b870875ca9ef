"""python -m llama.tune: measure the matmul kernels on this machine and cache the fastest
(see llama.native.tune)."""

from .cli import run
from .native.tune import main

if __name__ == "__main__":
    run(main)
