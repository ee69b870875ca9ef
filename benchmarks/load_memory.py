"""Peak memory and time of Llama.build on the demo model, against the size of its weights.

Run by hand: `python benchmarks/load_memory.py [--dtype fp32|bf16]`. Each build runs in a
fresh process so its peak resident memory (ru_maxrss) is its own. Prints a table and writes
benchmarks/results/load_memory.json.
"""

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from llama import Llama
from llama.demo import ensure_demo
path = str(ensure_demo(quiet=True))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
g = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu", dtype=sys.argv[1])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in g.model.parameters()}.values())
print(json.dumps({"dtype": sys.argv[1], "load_s": seconds, "rss_before_mb": before / 1024,
                  "rss_peak_mb": peak / 1024, "weights_mb": weights / 2**20}))
"""


def main() -> None:
    rows = []
    for dtype in sys.argv[1:] or ["fp32", "bf16"]:
        out = subprocess.run([sys.executable, "-c", CHILD, dtype], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'dtype':6} {'load s':>7} {'weights MB':>11} {'RSS before MB':>14} {'RSS peak MB':>12} {'growth/weights':>15}")
    for r in rows:
        growth = (r["rss_peak_mb"] - r["rss_before_mb"]) / r["weights_mb"]
        print(f"{r['dtype']:6} {r['load_s']:7.2f} {r['weights_mb']:11.0f} {r['rss_before_mb']:14.0f} "
              f"{r['rss_peak_mb']:12.0f} {growth:15.2f}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "load_memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
