"""Matmul kernels for decode-sized inputs against this machine's memory bandwidth.

    python benchmarks/kernel_bandwidth.py [--models demo,1b] [--rows 1,16] [--reps 15]

Measures the memory bandwidth (reading and copying a 1 GB tensor with torch's threads),
then for each matmul shape of SmolLM2-135M ("demo") and Llama-3.2-1B ("1b") at M rows of
x: our native kernels (bf16, q8_0, q4_0, q4_1 weights) beside PyTorch's plain bf16 kernel,
oneDNN's bf16 GEMM and torch's int8 weight-only kernel (`_weight_int8pack_mm`).
Effective GB/s = bytes of the weight / time of one call (weights rotate through 256 MB of
copies, far past the last-level cache, as in a decode step). Prints a table and writes
benchmarks/results/kernels-<cpu>.json with the CPU model and flags.
Timings are the fastest of --reps passes in the best of --rounds interleaved rounds (that
round's median is saved too): on a shared machine the median includes waits for other
processes.
"""

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import native  # noqa: E402
from llama.native import build  # noqa: E402
from llama.utils.cpu import cpu_flags, cpu_model, cpu_slug  # noqa: E402
from llama.tune import MODEL_SHAPES, model_shapes  # noqa: E402

LAYERS = {"demo": 30, "1b": 16}
PER_LAYER = {"wq/wo": 2, "wk/wv": 2, "w1/w3": 2, "w2": 1, "output": 0}  # the output runs once a step

COLD_BYTES = 256 << 20  # small weights rotate through this many bytes of copies (past any L3)


def timings(calls: List[Callable[[], object]], reps: int) -> Dict[str, float]:
    """Fastest and median seconds of one call: each rep runs every call of `calls` once
    (one per weight copy, so that no copy is still cached when it comes round again)."""
    for call in calls[:2]:
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) / len(calls))
    return {"best_s": min(times), "median_s": statistics.median(times)}


def bandwidth(reps: int) -> Dict[str, float]:
    """Memory bandwidth with torch's threads on a 1 GB tensor: reading it (the best of a
    few reductions, PyTorch's and the native library's XOR of 64-bit words; no single one
    always runs at memory speed) and copying it (read + write)."""
    a = torch.ones(256 << 20)  # 1 GB of fp32
    nbytes = a.numel() * 4
    probes = {"dot": lambda: torch.dot(a, a), "sum": lambda: a.sum(), "max_uint8": lambda: a.view(torch.uint8).max()}
    lib = native._lib()
    if lib is not None:  # the kernels' own plain loads: PyTorch's reductions fell short of them
        lib.llama_read_probe.restype = ctypes.c_uint64
        lib.llama_read_probe.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        probes["native_xor"] = lambda: lib.llama_read_probe(a.data_ptr(), nbytes, 0)
    read = {name: nbytes / timings([probe], reps)["best_s"] / 1e9 for name, probe in probes.items()}
    b = torch.empty_like(a)
    copy = 2 * nbytes / timings([lambda: b.copy_(a)], reps)["best_s"] / 1e9
    return {"read_GBps": max(read.values()), "read_probes_GBps": read, "copy_GBps": copy}


def _copies(tensor: torch.Tensor) -> List[torch.Tensor]:
    nbytes = tensor.numel() * tensor.element_size()
    return [tensor] + [tensor.clone() for _ in range(COLD_BYTES // nbytes)]


def _random_rows(n: int, k: int) -> torch.Tensor:
    """An [n, k] fp32 weight made of 64 random rows repeated (quick to make and quantize)."""
    base = torch.randn(64, k) / k ** 0.5
    return base.repeat((n + 63) // 64, 1)[:n].contiguous()


def kernel_calls(n: int, k: int, m: int) -> Dict[str, tuple]:
    """name -> (weight bytes, list of zero-argument calls) for one shape and M."""
    w = _random_rows(n, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = {}
    for layout in ("bf16", "q8_0", "q4_0", "q4_1"):
        packed = native.pack(w, layout)
        path = native.paths()[-1]
        nbytes = packed.numel() * packed.element_size()
        out[f"ours {layout}"] = (nbytes, [lambda p=p, layout=layout: native.native_linear(x, p, layout, path)
                                          for p in _copies(packed)])
    wb = w.to(torch.bfloat16)
    nbytes = wb.numel() * 2

    def torch_linear(weight: torch.Tensor, onednn: bool) -> Callable[[], object]:
        def call() -> object:
            torch.backends.mkldnn.enabled = onednn
            try:
                return torch.nn.functional.linear(x, weight)
            finally:
                torch.backends.mkldnn.enabled = True
        return call

    out["torch bf16"] = (nbytes, [torch_linear(c, False) for c in _copies(wb)])
    out["onednn bf16"] = (nbytes, [torch_linear(c, True) for c in _copies(wb)])
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    scales = scale.to(torch.bfloat16)
    out["torch int8"] = (q.numel() + scales.numel() * 2,
                         [lambda c=c: torch.ops.aten._weight_int8pack_mm(x, c, scales) for c in _copies(q)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,1b")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--reps", type=int, default=5, help="passes over all copies of a weight")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all kernels; the best round counts")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels-<cpu>.json)")
    args = parser.parse_args()
    if not native.available():
        sys.exit(f"native kernels are off: {build.status()['reason']}")

    bw = bandwidth(args.reps)
    print(f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}, native path "
          f"{native.paths()[-1]}: memory read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")
    results = []
    header = f"{'model':5} {'matmul':7} {'N x K':>14} {'M':>3}  " + "  ".join(
        f"{name:>11}" for name in ["ours bf16", "ours q8_0", "ours q4_0", "ours q4_1", "torch bf16", "onednn bf16",
                                   "torch int8"])
    print(f"effective GB/s (weight bytes / time), fastest of {args.reps} passes x {args.rounds} rounds")
    print(header)
    for model in args.models.split(","):
        for name, (n, k) in model_shapes(**MODEL_SHAPES[model]).items():
            for m in [int(r) for r in args.rows.split(",")]:
                cells = []
                kernels = kernel_calls(n, k, m)
                best: Dict[str, Dict[str, float]] = {}
                for _ in range(args.rounds):  # interleaved, so that a busy spell spoils one round, not a kernel
                    for kernel, (_, calls) in kernels.items():
                        t = timings(calls, args.reps)
                        if kernel not in best or t["best_s"] < best[kernel]["best_s"]:
                            best[kernel] = t
                for kernel, (nbytes, _) in kernels.items():
                    t = best[kernel]
                    gbps = nbytes / t["best_s"] / 1e9
                    results.append({"model": model, "matmul": name, "n": n, "k": k, "m": m, "kernel": kernel,
                                    "weight_bytes": nbytes, **t, "GBps": gbps,
                                    "fraction_of_read_bandwidth": gbps / bw["read_GBps"]})
                    cells.append(f"{gbps:11.1f}")
                print(f"{model:5} {name:7} {n:>6} x {k:<6} {m:>3}  " + "  ".join(cells), flush=True)

    print("\nall matmuls of one decode step (each shape as often as a step runs it): GB/s and % of read bandwidth")
    steps = {}
    for r in results:
        count = PER_LAYER[r["matmul"]] * LAYERS[r["model"]] or 1
        total = steps.setdefault((r["model"], r["m"], r["kernel"]), [0.0, 0.0])
        total[0] += count * r["weight_bytes"]
        total[1] += count * r["best_s"]
    summary = []
    for (model, m, kernel), (nbytes, seconds) in steps.items():
        gbps = nbytes / seconds / 1e9
        summary.append({"model": model, "m": m, "kernel": kernel, "step_weight_bytes": nbytes, "step_matmul_s": seconds,
                        "GBps": gbps, "fraction_of_read_bandwidth": gbps / bw["read_GBps"]})
        print(f"{model:5} M={m:<3} {kernel:12} {seconds * 1e3:8.2f} ms  {gbps:6.1f} GB/s  "
              f"{100 * gbps / bw['read_GBps']:5.0f}%")

    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"kernels-{cpu_slug()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "cpu": cpu_model(), "flags": cpu_flags(), "machine": platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "native_path": native.paths()[-1], "bandwidth": bw,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results, "decode_step": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
