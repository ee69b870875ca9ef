"""Every loaded weight is exactly the checkpoint's: for each dtype, shard count and world
size, each parameter of the built model equals the checkpoint's shards joined along Meta's
axes and cut for this rank, cast to the dtype, bit for bit, build after build.

(A loader that de-duplicated converted tensors by the address of a temporary gave later
weights an earlier weight's values in bf16/fp16, at random: hence the repeated builds.)
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import SPLIT4_PARAMS, expected_rank_weights, run_torchrun, wrong_weights
from llama import Llama
from llama.checkpoint import save_checkpoint
from llama.testing import random_meta_weights

WORKER = Path(__file__).resolve().parent / "loading_worker.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPEATS = 3  # builds per case: a wrong weight came in about 1 of 3 builds
# name -> (shards, embedding split on the vocabulary, output tied to the embedding, stored dtype)
CHECKPOINTS = {
    "1_shard": (1, False, False, torch.float32),
    "2_shards": (2, False, False, torch.float32),
    "4_shards": (4, False, False, torch.float32),
    "2_shards_vocab_split_bf16": (2, True, False, torch.bfloat16),
    "4_shards_vocab_split": (4, True, False, torch.float32),
    "1_shard_tied": (1, False, True, torch.float32),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Each checkpoint of CHECKPOINTS, written from the same random weights."""
    root = tmp_path_factory.mktemp("loading")
    weights = random_meta_weights(SPLIT4_PARAMS, seed=3)
    paths = {}
    for name, (shards, vocab_split, tied, dtype) in CHECKPOINTS.items():
        full = {k: v.to(dtype) for k, v in weights.items()}
        if tied:
            full["output.weight"] = full["tok_embeddings.weight"]
        save_checkpoint(full, dict(SPLIT4_PARAMS), str(root / name), shards, vocab_split)
        paths[name] = root / name
    tied_state = torch.load(paths["1_shard_tied"] / "consolidated.00.pth", weights_only=True)
    assert tied_state["output.weight"].data_ptr() == tied_state["tok_embeddings.weight"].data_ptr()
    return paths


def test_reference_joins_the_shards_back_into_the_written_weights(checkpoints):
    """The reference itself: joined shards are the weights that were written."""
    weights = random_meta_weights(SPLIT4_PARAMS, seed=3)
    for name, (_, vocab_split, tied, dtype) in CHECKPOINTS.items():
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        joined = expected_rank_weights(checkpoints[name], vocab_split, shapes, 0, 1, torch.float32)
        for key, value in weights.items():
            source = weights["tok_embeddings.weight"] if tied and key == "output.weight" else value
            assert torch.equal(joined[key], source.to(dtype).float()), (name, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_every_weight_is_the_checkpoints_in_one_process(ckpt, dtype, checkpoints, sp_tokenizer):
    _, vocab_split, tied, _ = CHECKPOINTS[ckpt]
    expected = None
    for build in range(REPEATS):
        gen = Llama.build(str(checkpoints[ckpt]), sp_tokenizer, max_seq_len=16, max_batch_size=1,
                          device="cpu", dtype=dtype)
        if expected is None:
            shapes = {k: tuple(v.shape) for k, v in gen.model.state_dict().items()}
            expected = expected_rank_weights(checkpoints[ckpt], vocab_split, shapes, 0, 1, DTYPES[dtype])
        assert wrong_weights(gen.model, expected) == [], f"build {build}"
        shared = gen.model.output.weight.data_ptr() == gen.model.tok_embeddings.weight.data_ptr()
        assert shared == tied, "tied weights must stay one tensor, and only they"
        del gen


@pytest.fixture(scope="module")
def two_rank_run(checkpoints, sp_tokenizer, tmp_path_factory) -> dict:
    """One torchrun launch: both ranks build every checkpoint x dtype REPEATS times."""
    work = tmp_path_factory.mktemp("loading_mp2")
    cases = [{"name": f"{ckpt}/{dtype}", "ckpt": str(checkpoints[ckpt]), "vocab_split": CHECKPOINTS[ckpt][1],
              "dtype": dtype} for ckpt in CHECKPOINTS for dtype in DTYPES]
    spec = work / "spec.json"
    spec.write_text(json.dumps({"tokenizer": sp_tokenizer, "out": str(work), "repeats": REPEATS,
                                "cases": cases}))
    job = run_torchrun(WORKER, [spec], timeout_s=300, LLAMA_DIST_TIMEOUT="120")
    logs = f"exit {job['rc']} after {job['elapsed']:.0f}s\n{job['stderr'][-6000:]}"
    assert job["rc"] == 0, logs
    reports = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("error" not in r for r in reports), logs
    return {r: report["cases"] for r, report in enumerate(reports)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_every_weight_is_the_checkpoints_on_two_ranks(ckpt, dtype, two_rank_run):
    for rank in range(2):
        case = two_rank_run[rank][f"{ckpt}/{dtype}"]
        assert (case["mp_size"], case["mp_rank"]) == (2, rank)
        assert len(case["builds"]) == REPEATS
        for build, result in enumerate(case["builds"]):
            assert result["wrong"] == [], f"rank {rank}, build {build}"
            shapes = result["shapes"]
            assert shapes["layers.0.attention.wq.weight"] == [SPLIT4_PARAMS["dim"] // 2, SPLIT4_PARAMS["dim"]]
            assert shapes["layers.0.feed_forward.w2.weight"] == [SPLIT4_PARAMS["dim"], 352 // 2]
