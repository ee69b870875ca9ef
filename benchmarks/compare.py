"""Before/after: our engine from two source trees on the demo model, in alternating rounds.

    git archive main | tar -x -C /tmp/base        # the tree to compare against
    python benchmarks/compare.py --base /tmp/base [--rounds 5] [--dtype bf16]

Each round loads the demo model once from the base tree and once from this one, each in its
own process, so both see the same machine load, and times greedy decoding: batch 1 (128 new
tokens after the chat prompt), a ragged batch of 4 (the masked decode path: prompts of
different lengths, 64 new tokens each) and a 512-token prefill. The table gives each
workload's median over the rounds; the greedy tokens of both trees are compared.
Writes benchmarks/results/compare.json.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import CHAT, PREFILL_TOKENS, workload_ids  # noqa: E402

DECODE_TOKENS, RAGGED_TOKENS = 128, 64
COLUMNS = [("decode_tok_s", "decode b1 tok/s"), ("ragged4_tok_s", "ragged b4 tok/s"), ("prefill_tok_s", "prefill tok/s")]


def child(tree: str, dtype: str, runs: int) -> None:
    """In a fresh process: time the workloads with the engine of `tree`."""
    sys.path.insert(0, tree)
    from llama import Llama
    from llama.demo import ensure_demo

    ids = json.loads(sys.stdin.read())
    g = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=1024, max_batch_size=4, device="cpu", dtype=dtype)
    chat, long = ids["chat"], ids["prefill"]
    ragged = [chat[: len(chat) - 7 * i] for i in range(4)]

    def best_time(prompts: List[List[int]], n: int) -> float:
        times = []
        for _ in range(runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            g.generate(prompts, n, temperature=0, stop_tokens=[])
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    first = best_time([chat], 1)  # prefill + one token, taken off the decode figures
    result = {
        "decode_tok_s": DECODE_TOKENS / (best_time([chat], DECODE_TOKENS + 1) - first),
        "ragged4_tok_s": 4 * RAGGED_TOKENS / best_time(ragged, RAGGED_TOKENS),
        "prefill_tok_s": PREFILL_TOKENS / best_time([long], 1),
        "tokens": g.generate([chat], 32, temperature=0)[0] + g.generate(ragged, 16, temperature=0)[0],
    }
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the source tree to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each workload per round")
    parser.add_argument("--dtype", default="bf16", help="bf16 (this CPU's default) or fp32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dtype, args.runs)
    if not args.base:
        parser.error("--base is required")

    ids = workload_ids()
    trees = {"base": str(Path(args.base).resolve()), "this": str(ROOT)}
    results: Dict[str, List[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--child", tree, "--dtype", args.dtype,
                                   "--runs", str(args.runs)], input=json.dumps(ids), capture_output=True, text=True)
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                sys.exit(f"{name}: failed\n{done.stderr[-2000:]}")
            results[name].append(json.loads(line[-1][len("RESULT "):]))

    medians = {name: {key: statistics.median(r[key] for r in rows) for key, _ in COLUMNS}
               for name, rows in results.items()}
    same_tokens = all(a["tokens"] == b["tokens"] for a, b in zip(results["base"], results["this"]))
    print(f"\ndemo model ({CHAT[0]['content'][:30]}...), {args.dtype}, on {platform.processor() or platform.machine()}: "
          f"medians of {args.rounds} alternating rounds\n")
    print(f"{'tree':6}" + "".join(f"{title:>18}" for _, title in COLUMNS))
    for name, row in medians.items():
        print(f"{name:6}" + "".join(f"{row[key]:>18.4g}" for key, _ in COLUMNS))
    print("this / base: " + ", ".join(f"{title} {medians['this'][k] / medians['base'][k]:.3f}x" for k, title in COLUMNS))
    print(f"greedy tokens equal: {same_tokens}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"machine": platform.processor(), "dtype": args.dtype, "base": trees["base"], "rounds": args.rounds,
         "medians": medians, "greedy_tokens_equal": same_tokens,
         "all": {name: [{k: r[k] for k, _ in COLUMNS} for r in rows] for name, rows in results.items()}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
