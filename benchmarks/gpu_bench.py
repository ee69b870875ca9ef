"""GPU benchmark: our engine against HF transformers on the same weights, on one CUDA GPU.

    python benchmarks/gpu_bench.py [--out gpu_bench.json] [--size 1b] [--prompts 128 --batch 32]

No model can be downloaded on a GPU machine here, so both engines run HF's randomly initialised
LlamaForCausalLM (--size 1b: Llama 3.2 1B's shape with a 32000-token vocabulary, or --size 8b:
Llama 3 8B's shape), converted to Meta's layout with our converter and loaded by Llama.build.
First a parity check in fp32 on the GPU (logits of a 64-token prompt, greedy tokens), then in
bf16, the default on this GPU, one engine after the other in the same process:
  decode b1     128 new tokens after a 64-token prompt (time to first token subtracted)
  prefill       a 512-token prompt, one new token
  batch16       16 prompts x 64 new tokens
  batch job     --prompts requests (prompts of 40-350 tokens, max_gen_len 16-256, each generating
                exactly its max_gen_len tokens), --batch rows at a time: our engine with
                continuous batching and with static chunks, HF generate() chunk by chunk
Prints a table with our figures over HF's and writes the JSON report (with the GPU's name).
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import Llama  # noqa: E402
from llama.utils.assets import SENTENCEPIECE_32K, fetch_wheel_file  # noqa: E402
from llama.checkpoint import save_checkpoint  # noqa: E402
from llama.checkpoint.convert.hf import meta_from_hf_state_dict, params_from_hf_config  # noqa: E402
from llama.runtime.engine import Engine, Request  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2),  # a smoke run of this script: --size tiny --device cpu
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}
VOCAB, DECODE, PREFILL, BATCH16, BATCH16_NEW = 32000, 128, 512, 16, 64


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn: Callable[[], object], runs: int = 3) -> float:
    """Median seconds of fn over `runs` runs after one warm-up, the GPU synchronised."""
    times = []
    for _ in range(runs + 1):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def workloads(gen: Callable[[List[List[int]], int], object], prompt: List[int], long: List[int]) -> dict:
    ttft = sync_time(lambda: gen([prompt], 1))
    return {
        "ttft_s": ttft,
        "decode_tok_s": DECODE / (sync_time(lambda: gen([prompt], DECODE + 1)) - ttft),
        "prefill_tok_s": PREFILL / sync_time(lambda: gen([long], 1)),
        "batch16_tok_s": BATCH16 * BATCH16_NEW / sync_time(lambda: gen([prompt] * BATCH16, BATCH16_NEW)),
    }


def batch_job_ours(g: Llama, requests: List[dict], policy: str) -> float:
    g.engine = Engine(g.model, policy=policy)

    def run(reqs):
        work = [Request(r["prompt"], r["max_gen_len"], temperature=0.0, stop_tokens=()) for r in reqs]
        for _, handle in g.complete(work):
            assert len(handle.tokens) == handle.request.max_gen_len, handle

    run([dict(r, max_gen_len=4) for r in requests[:8]])  # warm-up
    return sync_time(lambda: run(requests), runs=1)


def batch_job_hf(model, requests: List[dict], batch: int, device: str) -> float:
    @torch.inference_mode()
    def run(reqs):
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            width = max(len(r["prompt"]) for r in chunk)
            ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in chunk],
                                device=device)
            new = max(r["max_gen_len"] for r in chunk)  # generate() takes one budget per call
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)

    run([dict(r, max_gen_len=4) for r in requests[:8]])
    return sync_time(lambda: run(requests), runs=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_bench.json"))
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine (or --size tiny --device cpu for a smoke run)")
    import transformers

    transformers.logging.set_verbosity_error()
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else device
    report: Dict[str, object] = {"gpu": gpu, "torch": torch.__version__,
                                 "transformers": transformers.__version__, "size": args.size}
    print(json.dumps(report), flush=True)

    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      rope_theta=500000.0, tie_word_embeddings=False, **SIZES[args.size])
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config).eval()
    for param in hf.parameters():  # bf16 values, kept in fp32 for the parity check
        param.data = param.data.to(torch.bfloat16).float()
    params = params_from_hf_config(config.to_dict())
    weights = meta_from_hf_state_dict({k: v.detach().cpu().clone() for k, v in hf.state_dict().items()}, params)
    ckpt = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    save_checkpoint(weights, params, str(ckpt), n_shards=1)
    del weights
    tokenizer = str(fetch_wheel_file(*SENTENCEPIECE_32K))
    rng = random.Random(0)
    prompt = [1] + [rng.randrange(100, VOCAB) for _ in range(63)]
    long = [1] + [rng.randrange(100, VOCAB) for _ in range(PREFILL - 1)]
    requests = [{"prompt": [1] + [rng.randrange(100, VOCAB) for _ in range(rng.randint(40, 350))],
                 "max_gen_len": rng.randint(16, 256)} for _ in range(args.prompts)]
    seq_len = max(len(r["prompt"]) + r["max_gen_len"] for r in requests) + 8

    # Parity in fp32 on the GPU: our loader and forward pass against HF's on the same weights.
    hf32 = hf
    ours32 = Llama.build(str(ckpt), tokenizer, max_seq_len=seq_len, max_batch_size=args.batch, device=device,
                         dtype="fp32")
    with torch.inference_mode():
        theirs = hf32(torch.tensor([prompt], device=device)).logits.float()
        mine = ours32.model(torch.tensor([prompt], device=device)).float()
        report["fp32 logits max |ours - HF|"] = (theirs - mine).abs().max().item()
        report["fp32 logits max |HF|"] = theirs.abs().max().item()
        hf_tokens = hf32.generate(torch.tensor([prompt], device=device), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    our_tokens = ours32.generate([prompt], 32, temperature=0, stop_tokens=[])[0][0]
    report["fp32 greedy tokens equal (32)"] = hf_tokens == our_tokens
    print({k: v for k, v in report.items() if k.startswith("fp32")}, flush=True)
    del ours32
    for param in hf.parameters():  # not hf.to(): that would round the rotary frequencies too
        param.data = param.data.to(torch.bfloat16)

    results: Dict[str, dict] = {}

    @torch.inference_mode()
    def hf_gen(prompts, n):
        inp = torch.tensor(prompts, device=device)
        return hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    results["hf-bf16"] = workloads(hf_gen, prompt, long)
    results["hf-bf16"]["batch_job_s"] = batch_job_hf(hf, requests, args.batch, device)
    print("hf-bf16", results["hf-bf16"], flush=True)

    g = Llama.build(str(ckpt), tokenizer, max_seq_len=seq_len, max_batch_size=args.batch, device=device,
                    dtype="bf16" if device == "cpu" else None)
    report["our default dtype"] = str(next(g.model.parameters()).dtype)
    results["ours"] = workloads(lambda p, n: g.generate(p, n, temperature=0, stop_tokens=[]), prompt, long)
    results["ours"]["batch_job_s"] = batch_job_ours(g, requests, "continuous")
    results["ours-static"] = {"batch_job_s": batch_job_ours(g, requests, "static")}
    print("ours", results["ours"], flush=True)

    useful = sum(r["max_gen_len"] for r in requests)
    for r in results.values():
        r["batch_job_tok_s"] = useful / r.pop("batch_job_s")
    report["results"] = results
    cols = [("decode_tok_s", "decode b1 tok/s"), ("prefill_tok_s", "prefill tok/s"),
            ("batch16_tok_s", "batch16 tok/s"), ("ttft_s", "TTFT s"), ("batch_job_tok_s", "batch job tok/s")]
    print(f"\n{args.size} shape, random weights, {report['gpu']}, torch {report['torch']}; batch job: "
          f"{args.prompts} requests, {args.batch} rows\n")
    print(f"{'engine':12}" + "".join(f"{title:>17}" for _, title in cols))
    for name, r in results.items():
        print(f"{name:12}" + "".join(f"{'' if r.get(k) is None else format(r[k], '.3g'):>17}" for k, _ in cols))
    ratios = {title: (results["hf-bf16"][k] / results["ours"][k] if k == "ttft_s"
                      else results["ours"][k] / results["hf-bf16"][k]) for k, title in cols}
    ratios["batch job, continuous / static"] = (results["ours"]["batch_job_tok_s"]
                                                / results["ours-static"]["batch_job_tok_s"])
    report["ours / hf-bf16"] = ratios
    print("\nours / hf-bf16 (TTFT inverted): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
