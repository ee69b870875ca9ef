"""Every loaded weight is exactly the checkpoint's: for each dtype, shard count and world
size, each parameter of the built model equals the checkpoint's shards joined along Meta's
axes and cut for this rank, cast to the dtype, bit for bit, build after build.
And each rank opens only the shards that hold part of its slice: its own when the shard
count equals the model-parallel size.

(A loader that de-duplicated converted tensors by the address of a temporary gave later
weights an earlier weight's values in bf16/fp16, at random: hence the repeated builds.)
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import REPO
from helpers.processes import run_torchrun
from helpers.weights import SPLIT4_PARAMS, expected_rank_weights, pose_as_rank, spy_on_torch_load, wrong_weights
from llama import Llama
from llama.checkpoint import save_checkpoint
from llama.testing import random_meta_weights

WORKER = REPO / "tests" / "helpers" / "workers" / "loading_worker.py"
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
        with spy_on_torch_load() as opened:
            gen = Llama.build(str(checkpoints[ckpt]), sp_tokenizer, max_seq_len=16, max_batch_size=1,
                              device="cpu", dtype=dtype)
        assert opened == _shard_names(range(CHECKPOINTS[ckpt][0]))  # a world of one needs them all
        if expected is None:
            shapes = {k: tuple(v.shape) for k, v in gen.model.state_dict().items()}
            expected = expected_rank_weights(checkpoints[ckpt], vocab_split, shapes, 0, 1, DTYPES[dtype])
        assert wrong_weights(gen.model, expected) == [], f"build {build}"
        shared = gen.model.output.weight.data_ptr() == gen.model.tok_embeddings.weight.data_ptr()
        assert shared == tied, "tied weights must stay one tensor, and only they"
        del gen


def _shard_names(indices) -> list:
    return [f"consolidated.{i:02d}.pth" for i in indices]


# (shards, model-parallel size, rank) -> the shards that rank must open, and no other
RANK_SHARDS = {(2, 2, 0): [0], (2, 2, 1): [1], (4, 4, 3): [3],  # as many shards as ranks
               (4, 2, 1): [2, 3], (1, 2, 1): [0], (2, 4, 2): [1], (2, 4, 1): [0]}  # resharding


@pytest.mark.parametrize("shards, mp_size, rank", RANK_SHARDS)
def test_a_rank_opens_only_the_shards_holding_its_slice(shards, mp_size, rank, checkpoints, sp_tokenizer):
    """In this process, posing as rank `rank` of `mp_size`: what is opened, and what is loaded."""
    ckpt = {1: "1_shard", 2: "2_shards_vocab_split_bf16", 4: "4_shards"}[shards]
    vocab_split = CHECKPOINTS[ckpt][1]
    with pose_as_rank(rank, mp_size), spy_on_torch_load() as opened:
        gen = Llama.build(str(checkpoints[ckpt]), sp_tokenizer, max_seq_len=16, max_batch_size=1,
                          device="cpu", dtype="bf16")
    assert opened == _shard_names(RANK_SHARDS[shards, mp_size, rank])
    shapes = {k: tuple(v.shape) for k, v in gen.model.state_dict().items()}
    vocab, dim = SPLIT4_PARAMS["vocab_size"], SPLIT4_PARAMS["dim"]
    vocab_parallel = vocab_split or shards == 1  # the embedding is split as the shards split it
    assert shapes["tok_embeddings.weight"] == ((vocab // mp_size, dim) if vocab_parallel else (vocab, dim // mp_size))
    expected = expected_rank_weights(checkpoints[ckpt], vocab_split, shapes, rank, mp_size, torch.bfloat16)
    assert wrong_weights(gen.model, expected) == []


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
        shards, vocab_split, tied, _ = CHECKPOINTS[ckpt]
        for build, result in enumerate(case["builds"]):
            assert result["wrong"] == [], f"rank {rank}, build {build}"
            # N == M: its own shard alone; resharding: only the shards overlapping its slice.
            assert result["opened"] == _shard_names({1: [0], 2: [rank], 4: [2 * rank, 2 * rank + 1]}[shards])
            shapes, dim, vocab = result["shapes"], SPLIT4_PARAMS["dim"], SPLIT4_PARAMS["vocab_size"]
            assert shapes["layers.0.attention.wq.weight"] == [dim // 2, dim]
            assert shapes["layers.0.feed_forward.w2.weight"] == [dim, 352 // 2]
            # The embedding follows the shards' split; one shard's is split on the vocabulary,
            # as the output is, so that tied weights stay one tensor on every rank.
            vocab_parallel = vocab_split or shards == 1
            assert shapes["tok_embeddings.weight"] == ([vocab // 2, dim] if vocab_parallel else [vocab, dim // 2])
            assert result["tied"] == tied


# ---- what a build reads and keeps resident ------------------------------------------------------

MEMORY_CHILD = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from helpers.weights import pose_as_rank
import sentencepiece, torch  # imported before measuring: their code is not the build's memory
from llama import Llama

ckpt, tokenizer, dtype, rank, size = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
for shard in Path(ckpt).glob("*.pth"):  # from the disk, not the page cache (where read_bytes counts)
    fd = os.open(shard, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

def proc(name):  # the numeric fields of /proc/self/NAME (kB in status)
    lines = (line.partition(":") for line in Path("/proc/self", name).read_text().splitlines())
    return {k: int(v.split()[0]) for k, _, v in lines if v.split() and v.split()[0].isdigit()}

before_io, before_rss = proc("io")["read_bytes"], proc("status")["VmRSS"] * 1024
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
with pose_as_rank(rank, size):
    gen = Llama.build(ckpt, tokenizer, max_seq_len=8, max_batch_size=1, device="cpu", dtype=dtype)
with torch.inference_mode():
    for p in gen.model.parameters():
        p.sum()  # read every weight once, as a first forward pass would
params = list(gen.model.parameters())
print(json.dumps({"share": sum(p.numel() * p.element_size() for p in params),
                  "share_in_checkpoint": sum(p.numel() for p in params) * 2,
                  "read": proc("io")["read_bytes"] - before_io,
                  "rss_growth": proc("status")["VmHWM"] * 1024 - before_rss}))
"""


@pytest.fixture(scope="module")
def bf16_checkpoint_100mb(tmp_path_factory) -> Path:
    """2 shards of a bf16 model big enough for memory figures (weights: 90 MB in bf16)."""
    params = dict(SPLIT4_PARAMS, dim=512, n_layers=4, multiple_of=256)
    weights = {k: v.to(torch.bfloat16) for k, v in random_meta_weights(params, seed=1).items()}
    root = tmp_path_factory.mktemp("bf16_100mb")
    save_checkpoint(weights, params, str(root), 2)
    return root


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("dtype, rank, size, max_read", [
    ("fp32", 0, 1, 1.1), ("bf16", 1, 2, 1.1), ("fp32", 1, 2, 1.1),
    # 2 shards on 4 ranks: a rank keeps half of one shard, but the row-parallel weights and this
    # Llama 2 style (dim-split) embedding share each 4 KB page between two ranks' halves, so
    # it must read them whole: 1.45x its share at best (without read hints: 2.0x).
    ("bf16", 1, 4, 1.5)])
@pytest.mark.subprocess
def test_a_build_reads_its_share_once_and_keeps_no_copy_of_the_checkpoint(
        dtype, rank, size, max_read, bf16_checkpoint_100mb, sp_tokenizer):
    """Peak RSS growth stays near the rank's share of the weights in the target dtype (the
    pages of copied weights are let go: without that, bf16 shards copied into fp32 peak at
    1.5x the share), and a rank reads about its share of the checkpoint, nothing else."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(REPO), str(bf16_checkpoint_100mb),
                           sp_tokenizer, dtype, str(rank), str(size)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{dtype} rank {rank}/{size}: RSS growth {got['rss_growth'] / got['share']:.2f}x the share, "
          f"read {got['read'] / got['share_in_checkpoint']:.2f}x it; share {got['share'] / 2**20:.0f} MB, growth {got['rss_growth'] / 2**20:.0f} MB")
    # Beside the weights, a build keeps 15-25 MB whatever their size (tokenizer, module objects,
    # the allocator's own): measured here; a bound proportional to the share would not fit both.
    assert got["rss_growth"] <= 1.1 * got["share"] + 32 * 2**20
    assert got["read"] <= max_read * got["share_in_checkpoint"]  # 0 where the disk is memory (tmpfs)
