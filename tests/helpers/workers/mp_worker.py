"""Worker for tests/test_multiprocess.py, launched under torchrun (one process per rank).

Usage: python -m torch.distributed.run --nproc_per_node N tests/helpers/workers/mp_worker.py SPEC.json

SPEC holds the tokenizer path, the output folder, the prompts and a list of jobs, each
naming a checkpoint folder and optionally a dtype ("default": none given, whatever
LLAMA_DTYPE says), a quantize mode and a KV-cache dtype (kv_cache: LLAMA_KV_CACHE). For every job this process builds a Llama (the model-parallel size is
the world size unless the spec sets model_parallel_size), runs the same workloads the test
runs in-process, and finally writes everything to OUT/rank{RANK}.json. Every rank writes
its own file, since Llama.build silences stdout on ranks other than 0.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path


def run_job(job: dict, spec: dict) -> dict:
    import torch

    from llama import Llama

    start = time.time()
    dtype = job.get("dtype")  # "default": the engine's own choice, whatever LLAMA_DTYPE says
    saved = os.environ.pop("LLAMA_DTYPE", None) if dtype == "default" else None
    saved_cache = os.environ.get("LLAMA_KV_CACHE")
    if job.get("kv_cache"):  # LLAMA_KV_CACHE for this job's build
        os.environ["LLAMA_KV_CACHE"] = job["kv_cache"]
    try:
        gen = Llama.build(job["ckpt"], spec["tokenizer"], max_seq_len=spec["max_seq_len"],
                          max_batch_size=spec["max_batch_size"], device="cpu",
                          model_parallel_size=spec.get("model_parallel_size"),
                          dtype=None if dtype == "default" else dtype, quantize=job.get("quantize"),
                          prompt_lookup_num_tokens=job.get("prompt_lookup_num_tokens", 0),
                          draft_ckpt_dir=job.get("draft_ckpt"), num_assistant_tokens=job.get("num_assistant_tokens", 5))
    finally:
        if saved is not None:
            os.environ["LLAMA_DTYPE"] = saved
        if saved_cache is None:
            os.environ.pop("LLAMA_KV_CACHE", None)
        else:
            os.environ["LLAMA_KV_CACHE"] = saved_cache
    built_s = time.time() - start
    ctx = gen.ctx
    result = {
        "build_s": built_s,
        "drafted_rows": 0,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "model_parallel_size": ctx.model_parallel_size,
        "model_parallel_rank": ctx.model_parallel_rank,
        "data_parallel_size": ctx.data_parallel_size,
        "data_parallel_rank": ctx.data_parallel_rank,
        "backend": ctx.backend,
        "device": str(gen.device),
        "dtype": str(gen.model.norm.weight.dtype),
        "cache_dtype": str(gen.model.layers[0].attention.cache.k.dtype),
        "local_shapes": {name: list(p.shape) for name, p in gen.model.state_dict().items()
                         if name in ("output.weight", "tok_embeddings.weight",
                                     "layers.0.attention.wq.weight", "layers.0.attention.wo.weight")},
    }

    completions = gen.text_completion(spec["prompts"], temperature=0.0, top_p=0.9,
                                      max_gen_len=spec["max_gen_len"], logprobs=True)
    result["text_greedy"] = [dict(c) for c in completions]

    # A second turn: each prompt continued by its answer, whose keys and values are cached.
    reused = gen.engine.stats.prefix_reused
    continued = gen.text_completion([p + c["generation"] + " and" for p, c in zip(spec["prompts"], completions)],
                                    temperature=0.0, top_p=0.9, max_gen_len=spec["max_gen_len"], logprobs=True)
    result["text_continued"] = [dict(c) for c in continued]
    result["prefix_reused"] = gen.engine.stats.prefix_reused - reused

    echoed = gen.text_completion(spec["prompts"], temperature=0.0, top_p=0.9,
                                 max_gen_len=spec["max_gen_len"], logprobs=True, echo=True)
    result["text_greedy_echo"] = [dict(c) for c in echoed]

    tokens, logprobs = gen.generate(spec["token_prompts"], spec["max_gen_len"], temperature=0.0,
                                    top_p=0.9, logprobs=True)
    result["tokens_greedy"] = {"tokens": tokens, "logprobs": logprobs}
    # Each prompt, its answer, and the prompt again with the answer's start: material for drafts.
    again = [p + t + p + t[:3] for p, t in zip(spec["token_prompts"], tokens)]
    tokens, logprobs = gen.generate(again, spec["max_gen_len"], temperature=0.0, top_p=0.9, logprobs=True)
    result["tokens_again"] = {"tokens": tokens, "logprobs": logprobs}

    torch.manual_seed(spec["seed"])
    tokens, logprobs = gen.generate(spec["token_prompts"], spec["max_gen_len"], temperature=0.8,
                                    top_p=0.9, logprobs=True)
    result["tokens_sampled"] = {"tokens": tokens, "logprobs": logprobs}
    result["drafted_rows"] = gen.engine.stats.drafted_rows
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = Path(spec["out"]) / f"rank{rank}.json"
    report = {"rank_env": rank, "world_size_env": int(os.environ.get("WORLD_SIZE", "1")), "jobs": {}}
    try:
        for job in spec["jobs"]:
            report["jobs"][job["name"]] = run_job(job, spec)
    except BaseException:
        report["error"] = traceback.format_exc()
        out.write_text(json.dumps(report))
        sys.stderr.write(f"rank {rank} failed:\n{report['error']}")
        sys.exit(1)
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
