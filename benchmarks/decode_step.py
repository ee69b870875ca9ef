"""Per-step overhead at batch 1: the decode step as PyTorch runs it today, as one native call
(llama.native.decode), and through torch.compile (torch_compile_step.py beside this script).

    python benchmarks/decode_step.py [--dtype bf16] [--batch 1] [--steps 30] [--variants ...]

Each variant runs in its own process on the demo model (SmolLM2-135M-Instruct): prefill
32 tokens, then --steps decode steps; the table gives ms per step (fastest of 3 rounds)
and, for torch.compile, the compile time of the first call with an empty inductor cache
("cold") and again in a new process with the cache that run left on disk ("warm").
Writes benchmarks/results/decode-step-b<batch>-<cpu>.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("eager", "native", "native-q8_0", "native-q4_0", "native-q4_1", "compile", "compile-freezing")


def child(variant: str, dtype: str, batch: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from llama import Llama
    from llama.demo import ensure_demo

    g = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=256, max_batch_size=batch, device="cpu", dtype=dtype)
    model = g.model
    prompt = torch.randint(0, model.vocab_size, (batch, 32))
    model(prompt, 0)
    tokens, start = torch.randint(0, model.vocab_size, (batch,)), torch.full((batch,), 32)
    compile_s = None
    if variant == "eager":
        def step(t, pos):
            return model(t[:, None], pos, kv_len=int(pos.max()) + 1)[:, -1]
    elif variant.startswith("native"):
        from llama.native.decode import NativeDecoder

        step = NativeDecoder(model, variant.split("-")[1] if "-" in variant else None)
    else:
        import torch._inductor.config as inductor

        from torch_compile_step import compiled_decode_step  # beside this script

        if variant == "compile-freezing":
            inductor.freezing = True
        step = compiled_decode_step(model)
        began = time.perf_counter()
        step(tokens, start)
        compile_s = time.perf_counter() - began
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            began = time.perf_counter()
            for i in range(steps):
                step(tokens, start + i)
            best = min(best, (time.perf_counter() - began) / steps)
    return {"variant": variant, "ms_per_step": best * 1e3, "tok_s": batch / best, "compile_s": compile_s}


def run_child(variant: str, args: argparse.Namespace, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--dtype", args.dtype, "--batch", str(args.batch),
           "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"variant": variant, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant but torch.compile; the best counts")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.batch, args.steps)))
        return

    sys.path.insert(0, str(ROOT))
    from llama.utils.cpu import cpu_model, cpu_slug

    rows = []
    print(f"{cpu_model()}: demo model, {args.dtype}, batch {args.batch}")
    print(f"{'variant':18} {'ms/step':>8} {'tok/s':>7}  compile s (cold / warm)")
    for variant in args.variants.split(","):
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled yet
            result = run_child(variant, args, env)
            for _ in range(args.repeat - 1 if not variant.startswith("compile") else 0):
                again = run_child(variant, args, env)
                if again.get("ms_per_step", float("inf")) < result.get("ms_per_step", float("inf")):
                    result = again
            if variant.startswith("compile") and "error" not in result:
                warm = run_child(variant, args, env)  # a new process finds the on-disk cache
                result["compile_warm_s"] = warm.get("compile_s")
        rows.append(result)
        if "error" in result:
            print(f"{variant:18} failed: {result['error']}")
            continue
        compile_s = (f"{result['compile_s']:.1f} / {result['compile_warm_s']:.1f}"
                     if result.get("compile_s") is not None else "")
        print(f"{variant:18} {result['ms_per_step']:8.2f} {result['tok_s']:7.1f}  {compile_s}", flush=True)
    path = ROOT / "benchmarks" / "results" / f"decode-step-b{args.batch}-{cpu_slug()}.json"
    path.write_text(json.dumps({"cpu": cpu_model(), "dtype": args.dtype, "batch": args.batch,
                                "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
