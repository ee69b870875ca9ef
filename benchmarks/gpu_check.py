"""GPU checks that the CPU-only CI cannot make: run on a machine with a CUDA GPU (see
benchmarks/gpu_check.sh, which runs this after the tests). Prints one line per check and
writes a JSON report.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--dim 2048 --layers 8]

On a random GQA checkpoint (16 query heads, 4 key/value heads; the sentencepiece tokenizer):
the device and dtype chosen; NCCL bound to the device; whether an efficient kernel takes a mask
with grouped heads (then attention sends them as they are, else it folds query groups); decode
with PyTorch's math attention kernel switched off (so an efficient kernel must take every
call), in the chosen form and the folded one; decode speed of the chosen form against the
folded one; fp32 logits and greedy tokens on the GPU against the CPU; a ragged batch against
each prompt alone (fp32, the continuous-batching engine); the real-valued rotary form against
the complex one; every weight of a 4-shard bf16 checkpoint loaded onto the GPU in bf16 and
fp16, exactly the checkpoint's, build after build (issue 9's silent wrong-weights bug); int8
quantization refused by name (slower than bf16 on CUDA).

Exits non-zero, naming them, when a required check fails (require()): decode with the math
kernel off in the chosen form, fp32 logits and greedy tokens GPU against CPU, a ragged batch
against each prompt alone, the real rotary form against the complex one, every weight of the
4-shard checkpoint, int8 refused. The rest (speeds, bf16 agreements) are figures, printed and kept.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama.model.attention  # noqa: E402
import llama.model.transformer  # noqa: E402
from llama import Llama, LlamaError  # noqa: E402
from llama.utils.assets import SENTENCEPIECE_32K, fetch_wheel_file  # noqa: E402
from llama.runtime.devices import accelerator_has_native_bf16, default_dtype  # noqa: E402
from llama.checkpoint import save_checkpoint  # noqa: E402
from llama.testing import random_meta_weights, write_tiny_checkpoint  # noqa: E402

EFFICIENT = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
report: Dict[str, object] = {}


failed: List[str] = []  # the required checks that failed


def check(name: str, value) -> None:
    report[name] = value
    print(f"{name}: {value}", flush=True)


def require(name: str, ok: bool, value) -> None:
    """A check that must hold: reported as check() does, and counted when it fails."""
    check(name, value if ok else f"FAILED: {value}")
    if not ok:
        failed.append(name)


def folded(fn: Callable):
    """fn() with attention folding query groups (never a mask with grouped heads)."""
    saved = llama.model.attention.efficient_kernel_takes_grouped_mask
    llama.model.attention.efficient_kernel_takes_grouped_mask = lambda *args: False
    try:
        return fn()
    finally:
        llama.model.attention.efficient_kernel_takes_grouped_mask = saved


def decode_tok_s(g: Llama, prompts: List[List[int]], n: int, runs: int = 3) -> float:
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        g.generate(prompts, n, temperature=0, stop_tokens=[])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(prompts) * n / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine")

    gpu = torch.device("cuda", 0)
    check("torch", torch.__version__)
    check("gpu", f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
    check("native bf16", accelerator_has_native_bf16(gpu))
    check("default dtype", str(default_dtype(gpu)))

    tokenizer = str(fetch_wheel_file(*SENTENCEPIECE_32K))
    params = dict(dim=args.dim, n_layers=args.layers, n_heads=16, n_kv_heads=4, vocab_size=32000,
                  multiple_of=256, norm_eps=1e-5, rope_theta=10000.0)
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="gpu-check-")), params=params, dtype=torch.bfloat16)
    build = lambda **kw: Llama.build(str(ckpt), tokenizer, max_seq_len=1024, max_batch_size=4, **kw)  # noqa: E731

    g = build(dtype="bf16")
    import torch.distributed as dist

    check("backend", dist.get_backend())
    check("bound device", str(getattr(dist.group.WORLD, "bound_device_id", None)))
    for dtype in (torch.bfloat16, torch.float32):
        check(f"an efficient kernel takes a mask with grouped heads, {dtype}",
              llama.model.attention.efficient_kernel_takes_grouped_mask(gpu, dtype, args.dim // 16))
    prompt = g.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8, bos=True, eos=False)
    ragged = [prompt[: len(prompt) - 9 * i] for i in range(4)]

    # Math kernel off: every attention call must find an efficient kernel, or this raises.
    for name, prompts in (("batch 1", [prompt]), ("ragged batch 4", ragged)):
        try:
            with sdpa_kernel(EFFICIENT):
                g.generate(prompts, 16, temperature=0)
            require(f"decode without the math kernel, {name}", True, "ok")
        except RuntimeError as exc:
            require(f"decode without the math kernel, {name}", False, str(exc).splitlines()[0])
        try:
            with sdpa_kernel(EFFICIENT):
                folded(lambda: g.generate(prompts, 16, temperature=0))
            check(f"folded form without the math kernel, {name}", "ok")
        except RuntimeError as exc:
            check(f"folded form without the math kernel, {name}", f"FAILED: {str(exc).splitlines()[0][:120]}")

    for name, prompts, n in (("b1", [prompt], 128), ("ragged4", ragged, 64)):
        fold = folded(lambda: decode_tok_s(g, prompts, n))  # alternated, so neither gets the warm GPU
        chosen = decode_tok_s(g, prompts, n)
        fold = max(fold, folded(lambda: decode_tok_s(g, prompts, n)))
        check(f"decode {name} tok/s (chosen / folded attention form)",
              f"{chosen:.1f} / {fold:.1f} = {chosen / fold:.2f}x")
        same = g.generate(prompts, 32, temperature=0)[0] == folded(lambda: g.generate(prompts, 32, temperature=0)[0])
        check(f"bf16 greedy tokens equal, chosen vs folded form, {name}", same)

    # fp32 on the GPU against fp32 on the CPU.
    del g
    g32 = build(dtype="fp32")
    cpu32 = build(dtype="fp32", device="cpu")
    tokens = torch.tensor([prompt])
    diff = (g32.model(tokens.to(gpu)).cpu() - cpu32.model(tokens)).abs().max().item()
    require("fp32 logits max |GPU - CPU| (at most 1e-3)", diff <= 1e-3, f"{diff:.2e}")
    same = g32.generate(ragged, 32, temperature=0)[0] == cpu32.generate(ragged, 32, temperature=0)[0]
    require("fp32 greedy tokens GPU == CPU (ragged batch 4, 32 tokens)", same, same)
    same = g32.generate(ragged, 32, temperature=0)[0] == [g32.generate([p], 32, temperature=0)[0][0] for p in ragged]
    require("fp32 greedy tokens on the GPU, ragged batch 4 == each prompt alone", same, same)

    # The real-valued rotary form (MPS's) on the GPU against the complex one.
    saved = llama.model.transformer.complex_rotation
    llama.model.transformer.complex_rotation = lambda device: False
    try:
        real = build(dtype="fp32")
    finally:
        llama.model.transformer.complex_rotation = saved
    diff = (real.model(tokens.to(gpu)) - g32.model(tokens.to(gpu))).abs().max().item()
    require("real vs complex rotary, fp32 logits max diff (at most 1e-3)", diff <= 1e-3, f"{diff:.2e}")
    del g32, cpu32, real

    # A 4-shard bf16 checkpoint onto the GPU: every weight exactly the checkpoint's, three builds each.
    small = dict(params, dim=512, n_layers=4, n_heads=8, n_kv_heads=2)
    weights = {k: v.to(torch.bfloat16) for k, v in random_meta_weights(small, seed=5).items()}
    sharded = Path(tempfile.mkdtemp(prefix="gpu-check-4shards-"))
    save_checkpoint(weights, small, str(sharded), n_shards=4)
    for dtype in ("bf16", "fp16"):
        wrong = set()
        for _ in range(3):
            built = Llama.build(str(sharded), tokenizer, max_seq_len=64, max_batch_size=1, dtype=dtype)
            state = built.model.state_dict()
            wrong |= {k for k, v in weights.items() if not torch.equal(state[k].cpu(), v.to(state[k].dtype))}
        require(f"4-shard bf16 checkpoint loaded on the GPU in {dtype}: weights not the checkpoint's",
                not wrong, sorted(wrong) or "none")

    # int8 on CUDA: refused by name (its kernel decoded slower than bf16: 131 vs 223 tok/s on an H200).
    try:
        build(dtype="bf16", quantize="int8")
        require("int8 on CUDA refused as slower than bf16", False, "built")
    except LlamaError as exc:
        require("int8 on CUDA refused as slower than bf16", "slower than bf16" in str(exc), str(exc)[:120])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["failed"] = failed
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        print(f"error: {len(failed)} required GPU check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
