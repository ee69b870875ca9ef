"""Which threads should run the native kernels: torch's own OpenMP team, or a pool of our own?

    python benchmarks/threads.py [--layers 30] [--steps 20] [--dim 576 --hidden 1536] [--rows 1]

A decode-like loop alternates our matmuls with the small PyTorch ops between them (RMSNorm,
SiLU * up, residual add) for --layers layers per step, as a batch-1 decode step does. It
runs with the native kernels (a) on torch's OpenMP team (the default: the library links
torch's libgomp), (b) on a pool of our own threads that spin briefly and then sleep,
(c) on the calling thread only, and (d) PyTorch's own matmul for reference. Two pools on
the same cores fight: each one's spinning threads take the cores the other needs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import native  # noqa: E402
from llama.native import build  # noqa: E402
from llama.utils.cpu import cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layout", default="bf16")
    parser.add_argument("--rows", type=int, default=1, help="rows of x (batch); from about 16 rows of a 1B-sized "
                        "model, PyTorch's elementwise ops run on its threads too")
    args = parser.parse_args()
    lib = build.load()
    if lib is None:
        sys.exit(f"native kernels are off: {build.status()['reason']}")
    path = native.paths()[-1]
    up = [native.pack(torch.randn(args.hidden, args.dim) / args.dim ** 0.5, args.layout) for _ in range(args.layers)]
    down = [native.pack(torch.randn(args.dim, args.hidden) / args.hidden ** 0.5, args.layout)
            for _ in range(args.layers)]
    up_bf16 = [native.dequantize(w, args.layout, torch.bfloat16) for w in up]
    down_bf16 = [native.dequantize(w, args.layout, torch.bfloat16) for w in down]
    norm = torch.ones(args.dim, dtype=torch.bfloat16)

    def step(matmul) -> None:
        h = torch.randn(args.rows, args.dim, dtype=torch.bfloat16)
        for i in range(args.layers):
            x = F.rms_norm(h.float(), (args.dim,)).type_as(h) * norm
            g = matmul(x, i, True)
            a = F.silu(g) * g
            h = h + matmul(a, i, False)

    def ours(threads: int):
        return lambda x, i, is_up: native.native_linear(x, (up if is_up else down)[i], args.layout, path, threads)

    def torch_plain(x, i, is_up):
        return F.linear(x, (up_bf16 if is_up else down_bf16)[i])

    def timed(name: str, matmul, pool_threads: int = 0) -> None:
        lib.llama_native_set_pool(pool_threads)
        try:
            for _ in range(3):
                step(matmul)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step(matmul)
                times.append(time.perf_counter() - start)
        finally:
            lib.llama_native_set_pool(0)
        print(f"{name:44} best {min(times) * 1e3:7.2f} ms   median {statistics.median(times) * 1e3:7.2f} ms",
              flush=True)

    torch.backends.mkldnn.enabled = False  # PyTorch's plain kernels: its fastest for one row
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, {args.rows} rows, {args.layers} layers of "
          f"{args.layout} {args.hidden}x{args.dim} + {args.dim}x{args.hidden} per step")
    for _ in range(2):  # twice, to see the noise
        timed("native on torch's OpenMP team (default)", ours(0))
        timed("native on its own pool (spin, then sleep)", ours(0), pool_threads=torch.get_num_threads())
        timed("native on the calling thread only", ours(1))
        timed("PyTorch matmuls (reference)", torch_plain)


if __name__ == "__main__":
    main()
