"""Worker for tests/test_loading.py, launched once under torchrun: every rank builds every
case of SPEC.json several times and checks each loaded weight against the checkpoint.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/helpers/workers/loading_worker.py SPEC.json

SPEC: {"tokenizer", "out", "repeats", "cases": [{"name", "ckpt", "vocab_split", "dtype"}]}.
Each rank writes OUT/rank{RANK}.json: per case, the names of wrong weights in each build,
the local shapes, whether output and tok_embeddings are one tensor, and the files the build
opened with torch.load.
"""

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

from helpers.weights import expected_rank_weights, spy_on_torch_load, wrong_weights  # noqa: E402


def run_case(case: dict, spec: dict) -> dict:
    from llama import Llama

    builds, expected = [], None
    for _ in range(spec["repeats"]):
        with spy_on_torch_load() as opened:
            gen = Llama.build(case["ckpt"], spec["tokenizer"], max_seq_len=16, max_batch_size=1,
                              device="cpu", dtype=case["dtype"])
        ctx, model = gen.ctx, gen.model
        if expected is None:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            expected = expected_rank_weights(case["ckpt"], case["vocab_split"], shapes,
                                             ctx.model_parallel_rank, ctx.model_parallel_size,
                                             model.norm.weight.dtype)
        builds.append({"wrong": wrong_weights(model, expected),
                       "tied": model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr(),
                       "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
                       "opened": opened})
        del gen, model
    return {"mp_size": ctx.model_parallel_size, "mp_rank": ctx.model_parallel_rank, "builds": builds}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = Path(spec["out"]) / f"rank{rank}.json"
    report = {"cases": {}}
    try:
        for case in spec["cases"]:
            report["cases"][case["name"]] = run_case(case, spec)
    except BaseException:
        report["error"] = traceback.format_exc()
        sys.stderr.write(f"rank {rank} failed:\n{report['error']}")
    out.write_text(json.dumps(report))
    sys.exit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
