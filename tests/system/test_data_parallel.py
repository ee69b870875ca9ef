"""Data parallel x model parallel under real torchrun (gloo, CPU): a world of 4 processes with
model_parallel_size 2 holds 2 replicas of the model.

Two launches: tests/helpers/workers/mp_worker.py (Llama.build + generate on every rank: each replica is a
whole model and gives the world-of-one results), and llama.batch, in which the replicas share
the input; one rank is killed with SIGKILL midway and the job is resumed with a world of 2 (one
replica). Every id must then be in the output exactly once with the result an uninterrupted
world-of-one run writes (sampled lines included: a line's key is made from --seed and its id).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_multiprocess import (  # noqa: F401
    MAX_BATCH_SIZE,
    MAX_GEN_LEN,
    MAX_SEQ_LEN,
    PROMPTS,
    SEED,
    TOKEN_PROMPTS,
    WORKER,
    _assert_same_results,
    reference,
)

from helpers import REPO
from helpers.processes import free_port, run_torchrun
from llama.batch import run_batch

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def dp2_mp2_run(tmp_path_factory, tiny_ckpt_mp2, sp_tokenizer):
    work = tmp_path_factory.mktemp("dp2_mp2")
    spec = {"tokenizer": sp_tokenizer, "out": str(work), "max_seq_len": MAX_SEQ_LEN, "model_parallel_size": 2,
            "max_batch_size": MAX_BATCH_SIZE, "max_gen_len": MAX_GEN_LEN, "seed": SEED,
            "prompts": PROMPTS, "token_prompts": TOKEN_PROMPTS,
            "jobs": [{"name": "dp2_mp2", "ckpt": str(tiny_ckpt_mp2)}]}
    (work / "spec.json").write_text(json.dumps(spec))
    job = run_torchrun(WORKER, [work / "spec.json"], timeout_s=TIMEOUT_S, nproc=4, LLAMA_DIST_TIMEOUT="120")
    assert job["rc"] == 0, f"torchrun: exit {job['rc']}\n{job['stderr'][-6000:]}"
    return [json.loads((work / f"rank{r}.json").read_text())["jobs"]["dp2_mp2"] for r in range(4)]


def test_build_under_a_larger_world_makes_one_replica_per_group(dp2_mp2_run, reference):
    """Llama.build with model_parallel_size 2 in a world of 4: ranks 0-1 and 2-3 each hold a
    whole model (half of every weight per rank); each replica answers as the world-of-one
    model does, and all four ranks agree exactly."""
    layout = [(r["rank"], r["model_parallel_rank"], r["data_parallel_rank"], r["data_parallel_size"],
               r["model_parallel_size"]) for r in dp2_mp2_run]
    assert layout == [(0, 0, 0, 2, 2), (1, 1, 0, 2, 2), (2, 0, 1, 2, 2), (3, 1, 1, 2, 2)]
    assert dp2_mp2_run[0]["local_shapes"] == dp2_mp2_run[2]["local_shapes"]
    assert dp2_mp2_run[0]["local_shapes"]["layers.0.attention.wq.weight"][0] * 2 == \
        dp2_mp2_run[0]["local_shapes"]["layers.0.attention.wq.weight"][1]  # half of the rows of a square wq
    for r in dp2_mp2_run:
        _assert_same_results(r, reference, f"rank {r['rank']}")
        for key in ("tokens_greedy", "tokens_sampled", "text_greedy", "text_greedy_echo"):
            assert r[key] == dp2_mp2_run[0][key], (r["rank"], key)


def _results(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"
    return {r["id"]: r["generation"] for r in records}


def _children(pid: int) -> list:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.torchrun
def test_batch_replicas_share_the_input_exactly_once_after_kill_and_resume(tmp_path, tiny_ckpt, tiny_ckpt_mp2,
                                                                           sp_tokenizer, generator):
    lines = [{"id": f"q{i}", "prompt": f"Item {i}: once upon a time"} for i in range(24)]
    lines[4]["temperature"] = 0
    lines[9]["max_gen_len"] = 3
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    flags = ["--input", inp, "--output", out, "--ckpt_dir", tiny_ckpt_mp2, "--tokenizer_path", sp_tokenizer,
             "--temperature", "0.8", "--max_gen_len", "20", "--max_seq_len", "64", "--max_batch_size", "4",
             "--seed", "7", "--model_parallel_size", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", LLAMA_PROGRESS="0", LLAMA_DIST_TIMEOUT="60", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "llama.batch", *map(str, flags)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT_S
        # kill once both replicas have written (replica r takes the pending lines r, r + 2, ...)
        while not (out.exists() and {int(json.loads(line)["id"][1:]) % 2 for line in out.read_text().splitlines()
                                     if line.endswith("}")} == {0, 1}):
            assert proc.poll() is None, f"batch job ended early: {proc.communicate()[1][-4000:]}"
            assert time.time() < deadline, "no result appeared in time"
            time.sleep(0.01)
        workers = sorted(_children(proc.pid))
        assert len(workers) == 4, workers
        os.kill(workers[-1], signal.SIGKILL)  # one rank of replica 1 dies; torchrun ends the rest
        proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    before = _results(out)
    assert 0 < len(before) < len(lines), "the job was not killed midway"
    assert {int(k[1:]) % 2 for k in before} == {0, 1}, sorted(before)  # both replicas wrote, no id twice

    # Resume in a world of 2 (one replica of MP 2): only the missing ids are run.
    cmd[cmd.index("4")] = "2"
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    done = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"({len(before)} were there already)" in done.stderr
    resumed = _results(out)
    assert sorted(resumed) == sorted(x["id"] for x in lines)
    assert all(resumed[k] == v for k, v in before.items())

    # An uninterrupted world-of-one run writes the very same results (fp32, keys from seed + id).
    ref = tmp_path / "ref.jsonl"
    run_batch(generator, str(inp), str(ref), defaults=(0.8, 0.9, 20), seed=7)
    assert resumed == _results(ref)
    assert len(set(resumed.values())) == len(lines)
