"""Batch decode at long contexts, by KV-cache dtype (LLAMA_KV_CACHE), beside HF transformers.

    python benchmarks/kv_cache.py [--context 1024] [--runs 3] [--engines ours-fp32,ours-bf16,hf-bf16]

The demo model, batch 16, every row a prompt of --context random token ids (fixed seed),
greedy decode. Decode tok/s is timed over the decode steps alone (ours: the engine's steps that
prefill nothing; HF: from its first new token to its last, by a streamer), the median of
--runs, at the long context and at a short one (64 tokens); the difference
of the two step times is what the longer cache costs a step, which with the bytes of cache a
step reads gives the rate the cache is read at (against the machine's read bandwidth, probed
in the same run). Each engine runs in its own process.

Rows: ours with the fp32 cache (the CPU's default), ours with a bf16 cache, HF transformers
in bf16 (whose cache is bf16). Accuracy: the bf16 cache against the fp32 one on the demo
model, the logits of each step from the same fed tokens (a real chat prompt, then greedy):
the largest difference relative to the logits' range, and the greedy tokens that agree,
beside the same for the bf16 model against the fp32 one. The run fails (exit 1) where a bf16
cache takes the bf16 model more than twice as far from the fp32 one as it is without (the
bound docs/native-kernels.md states).

Writes benchmarks/results/kv-cache-<cpu>.json.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
BATCH, SHORT_CONTEXT, NEW_TOKENS = 16, 64, 33
ACCURACY_STEPS = 64
ENGINES = ("ours-fp32", "ours-bf16", "hf-bf16")


def prompts(context: int) -> List[List[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (BATCH, context), generator=g).tolist()


def decode_tok_s(gen: Callable[[List[List[int]], int], Tuple[float, int]], rows: List[List[int]], runs: int) -> float:
    """New tokens per second of a batch decode: gen(rows, n) -> (seconds, tokens) of its decode
    steps alone (prefill, which would swamp a long context's decode in its noise, left out);
    the median of `runs`."""
    gen(rows, 2)  # warm-up
    rates = []
    for _ in range(runs):
        seconds, tokens = gen(rows, NEW_TOKENS)
        rates.append(tokens / seconds)
    return statistics.median(rates)


def run_ours(cache: str, context: int, runs: int) -> dict:
    os.environ["LLAMA_KV_CACHE"] = cache
    sys.path.insert(0, str(ROOT))
    from llama import Llama
    from llama.demo import ensure_demo

    g = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=context + NEW_TOKENS + 8, max_batch_size=BATCH,
                    device="cpu", prefix_cache=False)
    engine, step = g.engine, g.engine.step
    decode = {"s": 0.0, "tokens": 0}

    def timed_step():  # the engine's steps that prefill nothing: decode alone
        prefills, useful = engine.stats.prefill_passes, engine.stats.decode_useful
        start = time.perf_counter()
        events = step()
        if engine.stats.prefill_passes == prefills:
            decode["s"] += time.perf_counter() - start
            decode["tokens"] += engine.stats.decode_useful - useful
        return events

    engine.step = timed_step

    def gen(rows, n):
        decode.update(s=0.0, tokens=0)
        g.generate(rows, n, temperature=0, stop_tokens=[])
        return decode["s"], decode["tokens"]

    model = g.model
    native = engine._native_step()
    per_token = 2 * model.params.n_layers * model.params.kv_heads * model.params.head_dim * \
        model.layers[0].attention.cache.k.element_size()
    return {"short_tok_s": decode_tok_s(gen, prompts(SHORT_CONTEXT), runs),
            "long_tok_s": decode_tok_s(gen, prompts(context), runs),
            "cache_bytes_per_token": per_token,
            "decode_backend": "torch" if native is None else
            ",".join(f"b{b}:{v}" for b, v in sorted(native.verdicts.items()))}


def run_hf(context: int, runs: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import hf_model  # benchmarks/, beside this file

    model = hf_model("bfloat16")

    class Clock:  # generate() hands a streamer the prompt, then each step's new tokens
        def __init__(self):
            self.times = []

        def put(self, _):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.inference_mode()
    def gen(rows, n):
        inp, clock = torch.tensor(rows), Clock()
        model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, streamer=clock)
        # from the first new token (prefill done) to the last: the decode steps alone
        return clock.times[-1] - clock.times[1], BATCH * (len(clock.times) - 2)

    return {"short_tok_s": decode_tok_s(gen, prompts(SHORT_CONTEXT), runs),
            "long_tok_s": decode_tok_s(gen, prompts(context), runs)}


def accuracy() -> dict:
    """The bf16 cache's cost beside what bf16 weights already cost: the logits of each step
    from the same fed tokens (a real chat prompt, then the fp32 model's greedy choices), of
    the fp32 model (fp32 cache: the reference), the bf16 model as users run it (fp32 cache)
    and the bf16 model with a bf16 cache: PyTorch's step on all three, and the native step
    (its bf16 attention kernel, where the CPU has AVX512-BF16) on the last."""
    import torch

    sys.path.insert(0, str(ROOT))
    from llama import Llama
    from llama.demo import ensure_demo
    from llama.native.decode import NativeDecoder

    def build(dtype: str, cache: str):
        os.environ["LLAMA_KV_CACHE"] = cache
        return Llama.build(str(ensure_demo(quiet=True)), max_seq_len=512, max_batch_size=1, device="cpu",
                           dtype=dtype)

    def steps(model, prompt, feed=None, native=False):
        logits = model(torch.tensor([prompt]), 0)[:, -1].float()
        step = NativeDecoder(model) if native else lambda t, p: model(t[:, None], p)[:, -1].float()
        out, fed = [], []
        for i in range(ACCURACY_STEPS):
            token = logits.argmax(-1) if feed is None else feed[i]
            logits = step(token, torch.tensor([len(prompt) + i]))
            out.append(logits)
            fed.append(token)
        return out, fed

    def compare(ref, ours) -> dict:
        return {"max_logit_diff_of_range": max(((o - r).abs().max() / (r.max() - r.min())).item()
                                               for r, o in zip(ref, ours)),
                "greedy_agree": sum(int(o.argmax() == r.argmax()) for r, o in zip(ref, ours))}

    g = build("fp32", "fp32")
    prompt = g.formatter.encode_dialog_prompt([{"role": "user", "content": "Explain why the sky is blue."}])
    exact, fed = steps(g.model, prompt)
    default, _ = steps(build("bf16", "fp32").model, prompt, fed)
    rounded, _ = steps(build("bf16", "bf16").model, prompt, fed)
    native, _ = steps(build("bf16", "bf16").model, prompt, fed, native=True)
    return {"steps": ACCURACY_STEPS, "prompt_tokens": len(prompt),
            "bf16_weights_vs_fp32": compare(exact, default), "bf16_cache_vs_fp32_cache": compare(default, rounded),
            "bf16_cache_vs_fp32": compare(exact, rounded), "bf16_cache_native_step_vs_fp32": compare(exact, native)}


def child(engine: str, context: int, runs: int) -> None:
    if engine == "accuracy":
        result = accuracy()
    elif engine == "hf-bf16":
        result = run_hf(context, runs)
    else:
        result = run_ours(engine.split("-")[1], context, runs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def in_child(engine: str, context: int, runs: int) -> dict:
    print(f"running {engine} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, __file__, "--child", engine, "--context", str(context),
                           "--runs", str(runs)], capture_output=True, text=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per row (default 1024)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.context, args.runs)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_bandwidth import bandwidth
    from run import machine, slug

    results = {name: in_child(name, args.context, args.runs) for name in args.engines.split(",")}
    check = in_child("accuracy", args.context, args.runs)
    bw = bandwidth(5)["read_GBps"]  # after the children: a child starts with its parent's peak RSS
    m = machine()
    print(f"\nbatch {BATCH} decode, demo model, on {m['cpu']}, {m['cores']} cores; read bandwidth {bw:.1f} GB/s\n")
    print(f"{'engine':11}{'ctx 64 tok/s':>14}{f'ctx {args.context} tok/s':>16}{'cache read GB/s':>17}"
          f"{'peak MB':>10}  decode backend")
    for name, r in results.items():
        rate = ""
        if "cache_bytes_per_token" in r:  # the cache a long step reads, over what the longer cache costs it
            extra_s = BATCH / r["long_tok_s"] - BATCH / r["short_tok_s"]
            read = r["cache_bytes_per_token"] * BATCH * (args.context + NEW_TOKENS / 2)
            r["cache_read_GBps"] = read / extra_s / 1e9 if extra_s > 0 else None
            rate = f"{r['cache_read_GBps']:.1f}" if r["cache_read_GBps"] else "-"
        print(f"{name:11}{r['short_tok_s']:>14.4g}{r['long_tok_s']:>16.4g}{rate:>17}{r['peak_rss_mb']:>10.4g}"
              f"  {r.get('decode_backend', '')}")
    if "hf-bf16" in results:
        print(f"ctx {args.context} vs hf-bf16: " + ", ".join(
            f"{name} {r['long_tok_s'] / results['hf-bf16']['long_tok_s']:.2f}x"
            for name, r in results.items() if name.startswith("ours")))
    if "ours-fp32" in results and "ours-bf16" in results:
        print(f"ctx {args.context}, bf16 cache vs fp32 cache: "
              f"{results['ours-bf16']['long_tok_s'] / results['ours-fp32']['long_tok_s']:.2f}x")
    weights, cache, both, native = (check[k] for k in ("bf16_weights_vs_fp32", "bf16_cache_vs_fp32_cache",
                                                       "bf16_cache_vs_fp32", "bf16_cache_native_step_vs_fp32"))
    n = check["steps"]
    print(f"accuracy over {n} steps, the largest logit difference as a share of the logits' range (greedy tokens "
          f"agreeing):\n  bf16 model vs fp32 {weights['max_logit_diff_of_range']:.2%} ({weights['greedy_agree']}/{n}); "
          f"with a bf16 cache vs without {cache['max_logit_diff_of_range']:.2%} ({cache['greedy_agree']}/{n});\n"
          f"  with a bf16 cache vs fp32 {both['max_logit_diff_of_range']:.2%} ({both['greedy_agree']}/{n}), "
          f"native step {native['max_logit_diff_of_range']:.2%} ({native['greedy_agree']}/{n})")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"kv-cache-{slug(m['cpu'])}.json").write_text(json.dumps(
        {"machine": m, "read_GBps": bw, "workload": {"batch": BATCH, "context": args.context,
                                                      "short_context": SHORT_CONTEXT, "new_tokens": NEW_TOKENS,
                                                      "runs": args.runs},
         "results": results, "accuracy": check}, indent=2) + "\n")
    if max(both["max_logit_diff_of_range"], native["max_logit_diff_of_range"]) > 2 * weights["max_logit_diff_of_range"]:
        sys.exit("with a bf16 cache the bf16 model is more than twice as far from the fp32 one as without: "
                 "past the bound docs/native-kernels.md states")


if __name__ == "__main__":
    main()
