"""The CPU cost of the model's alternative forms, per call, at the demo model's shapes
(9 query heads, 3 key/value heads, head dim 64): the rotary rotation as complex numbers
(CPU, CUDA) or in real numbers (MPS), and decode attention with a mask and grouped heads
(the CPU's form), folded query groups (accelerators' form for a ragged batch) or no mask
(rows at a common position).

    python benchmarks/forms.py [--threads 1]

Prints microseconds per call (median of 5 batches) and writes benchmarks/results/forms.json.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.model import ModelArgs  # noqa: E402
from llama.model.attention import attend  # noqa: E402
from llama.model.rotary import apply_rotary, rotation_table  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def rotary_forms() -> Dict[str, float]:
    args = ModelArgs(dim=HEADS * HEAD_DIM, n_heads=HEADS)
    tables = {"complex": rotation_table(args, 1024), "real": rotation_table(args, 1024, complex_form=False)}
    out = {}
    for batch, seqlen in ((1, 1), (16, 1), (1, 512)):
        x = torch.randn(batch, seqlen, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        positions = torch.arange(seqlen).expand(batch, seqlen)
        for form, table in tables.items():
            rotation = table[positions].unsqueeze(2)
            calls = 2000 if seqlen == 1 else 50
            out[f"rotary {form} B={batch} S={seqlen}"] = per_call_us(
                lambda: apply_rotary(x, rotation, torch.float32), calls)
    return out


def attention_forms() -> Dict[str, float]:
    out = {}
    for batch, length in ((1, 300), (4, 300), (16, 100)):
        q = torch.randn(batch, HEADS, 1, HEAD_DIM)
        k, v = torch.randn(2, batch, KV_HEADS, length, HEAD_DIM)
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        groups = HEADS // KV_HEADS
        forms = {
            "mask + grouped heads (CPU)": lambda: attend(q, k, v, mask),
            "folded groups + mask (accelerators, ragged)": lambda: F.scaled_dot_product_attention(
                q.reshape(batch, KV_HEADS, groups, HEAD_DIM), k, v, attn_mask=mask.repeat(1, 1, groups, 1)),
            "no mask (common position)": lambda: attend(q, k, v, None),
        }
        for form, fn in forms.items():
            out[f"attention {form} B={batch} L={length}"] = per_call_us(fn, 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {**rotary_forms(), **attention_forms()}
    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:{width}}  {us:8.1f} us")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "forms.json").write_text(json.dumps(
        {"machine": platform.processor(), "threads": args.threads, "torch": torch.__version__,
         "us_per_call": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
