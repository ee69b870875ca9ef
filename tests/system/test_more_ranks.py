"""Four model-parallel ranks (torchrun, gloo): a model whose heads, kv heads, dim, ffn and vocab
all divide by 4, from a 4-shard checkpoint (Llama 3 style, the embedding split on the
vocabulary) and from a 2-shard one (resharded 2 -> 4), in fp32 against the same model in one
process, and in the default dtype. (A model-parallel size smaller than the world size, 2 of 4,
is tests/test_data_parallel.py's.)"""

import json

import pytest
from test_multiprocess import (
    LOGPROB_ATOL,
    MAX_BATCH_SIZE,
    MAX_GEN_LEN,
    MAX_SEQ_LEN,
    PROMPTS,
    SEED,
    TOKEN_PROMPTS,
    WORKER,
    _assert_same_results,
)

from helpers.processes import run_torchrun
from helpers.weights import SPLIT4_PARAMS
from helpers.workers.mp_worker import run_job
from llama.checkpoint import save_checkpoint
from llama.testing import random_meta_weights

NPROC = 4
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def split4_ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("split4")
    weights = random_meta_weights(SPLIT4_PARAMS, seed=5)
    paths = {}
    for name, shards, vocab_split in (("1_shard", 1, False), ("4_shards_vocab_split", 4, True), ("2_shards", 2, False)):
        save_checkpoint(dict(weights), dict(SPLIT4_PARAMS), str(root / name), shards, vocab_split)
        paths[name] = str(root / name)
    return paths


def _spec(work, sp_tokenizer, jobs) -> dict:
    return {"tokenizer": sp_tokenizer, "out": str(work), "max_seq_len": MAX_SEQ_LEN,
            "max_batch_size": MAX_BATCH_SIZE, "max_gen_len": MAX_GEN_LEN, "seed": SEED,
            "prompts": PROMPTS, "token_prompts": TOKEN_PROMPTS, "jobs": jobs}


@pytest.fixture(scope="module")
def mp4_run(tmp_path_factory, split4_ckpts, sp_tokenizer) -> list:
    work = tmp_path_factory.mktemp("mp4_run")
    jobs = [{"name": "mp4_from_4_shards", "ckpt": split4_ckpts["4_shards_vocab_split"], "dtype": "fp32"},
            {"name": "mp4_from_2_shards", "ckpt": split4_ckpts["2_shards"], "dtype": "fp32"},
            {"name": "mp4_default_dtype", "ckpt": split4_ckpts["4_shards_vocab_split"], "dtype": "default"}]
    (work / "spec.json").write_text(json.dumps(_spec(work, sp_tokenizer, jobs)))
    job = run_torchrun(WORKER, [work / "spec.json"], timeout_s=TIMEOUT_S, nproc=NPROC, LLAMA_DIST_TIMEOUT="120")
    assert job["rc"] == 0, f"torchrun: exit {job['rc']}\n{job['stderr'][-6000:]}"
    return [json.loads((work / f"rank{r}.json").read_text())["jobs"] for r in range(NPROC)]


@pytest.fixture(scope="module")
def split4_reference(tmp_path_factory, split4_ckpts, sp_tokenizer) -> dict:
    """The same workloads on the 1-shard checkpoint in this process (a world of one), fp32."""
    work = tmp_path_factory.mktemp("mp4_reference")
    return run_job({"ckpt": split4_ckpts["1_shard"], "dtype": "fp32"}, _spec(work, sp_tokenizer, []))


@pytest.mark.parametrize("job", ["mp4_from_4_shards", "mp4_from_2_shards"])
@pytest.mark.slow
def test_four_ranks_match_one_process(mp4_run, split4_reference, job):
    for rank, results in enumerate(mp4_run):
        res = results[job]
        assert (res["rank"], res["world_size"], res["model_parallel_size"], res["model_parallel_rank"]) == \
            (rank, NPROC, NPROC, rank)
        assert res["local_shapes"]["layers.0.attention.wq.weight"] == [128 // NPROC, 128]
        assert res["local_shapes"]["layers.0.attention.wo.weight"] == [128, 128 // NPROC]
        _assert_same_results(res, split4_reference, f"{job} rank {rank}")
        for row, ref in zip(res["tokens_sampled"]["logprobs"], split4_reference["tokens_sampled"]["logprobs"]):
            assert row == pytest.approx(ref, abs=LOGPROB_ATOL)
        assert res["tokens_sampled"]["tokens"] == split4_reference["tokens_sampled"]["tokens"]


def test_four_ranks_in_the_default_dtype_agree_exactly(mp4_run, split4_reference):
    from helpers.precision import BF16_LOGPROB_BOUND, DEFAULT_HERE

    first = mp4_run[0]["mp4_default_dtype"]
    assert first["dtype"] == str(DEFAULT_HERE)
    for results in mp4_run[1:]:
        for key in ("tokens_greedy", "tokens_sampled", "text_greedy", "text_greedy_echo"):
            assert results["mp4_default_dtype"][key] == first[key], key
    # Teacher-forced scores of the prompts (echo) within the bf16 bound of the fp32 model's.
    for got, ref in zip(first["text_greedy_echo"], split4_reference["text_greedy_echo"], strict=True):
        n = next((i for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
        assert n >= 2 and max(abs(a - b) for a, b in zip(got["logprobs"][:n], ref["logprobs"][:n])) < BF16_LOGPROB_BOUND
