"""RANK / WORLD_SIZE / LOCAL_RANK as a launcher (or a user) leaves them: a world of one is
rank 0's and prints; a contradictory environment is a one-line error at once, never silence
and never a wait for processes that will not come."""

import os
import subprocess
import sys
import time

import pytest

from helpers import REPO
from helpers.processes import free_port
from llama.errors import LlamaError
from llama.utils.ranks import is_main_rank, launch_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    """Set launch variables as a process that has not joined a process group yet sees them."""
    import llama.utils.ranks

    monkeypatch.setattr(llama.utils.ranks.dist, "is_initialized", lambda: False)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize("values,expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "1", "WORLD_SIZE": "1"}, (0, 1, 0)),
    ({"RANK": "3", "LOCAL_RANK": "2"}, (0, 1, 0)),  # no WORLD_SIZE: a world of one
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, (3, 4, 1)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, (1, 2, 1)),
])
def test_consistent_environments(env, values, expected):
    env(**values)
    assert launch_env() == expected


def test_a_world_of_one_is_the_main_rank_and_says_what_it_ignored(env, capsys):
    env(RANK="1", WORLD_SIZE="1", LOCAL_RANK="1")
    assert is_main_rank()
    assert launch_env(announce=True) == (0, 1, 0)
    assert "ignoring RANK=1 LOCAL_RANK=1: a world of one process (WORLD_SIZE=1) is rank 0" in capsys.readouterr().err


@pytest.mark.parametrize("values,match", [
    ({"RANK": "abc"}, "RANK='abc' must be a whole number"),
    ({"RANK": "-1", "WORLD_SIZE": "1"}, "RANK='-1' must be a whole number"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"LOCAL_RANK": ""}, "LOCAL_RANK=''"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 is outside a world of WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_RANK=1 does not fit RANK=0"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_WORLD_SIZE=1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT .* are not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT .* is not set"),
])
def test_contradictions_are_errors(env, values, match):
    env(**values)
    with pytest.raises(LlamaError, match=match):
        launch_env()
    assert is_main_rank()  # so the error is seen


def _example(tiny_ckpt, sp_tokenizer, **env_values) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO), **env_values)
    return subprocess.run([sys.executable, str(REPO / "example_text_completion.py"), "--ckpt_dir", str(tiny_ckpt),
                           "--tokenizer_path", sp_tokenizer, "--max_gen_len", "3"],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_rank_1_of_a_world_of_one_prints(tiny_ckpt, sp_tokenizer):
    """Meta's issue-tracker recipe `RANK=1 WORLD_SIZE=1 python script.py` prints its results."""
    done = _example(tiny_ckpt, sp_tokenizer, RANK="1", WORLD_SIZE="1", LOCAL_RANK="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n==================================\n") == 3, done.stdout
    assert "ignoring RANK=1 LOCAL_RANK=1" in done.stderr


@pytest.mark.subprocess
def test_rank_outside_the_world_fails_at_once(tiny_ckpt, sp_tokenizer):
    """Before this check the process waited for its missing peers until the rendezvous timed out."""
    start = time.monotonic()
    done = _example(tiny_ckpt, sp_tokenizer, RANK="3", WORLD_SIZE="2", LOCAL_RANK="0",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: RANK=3 is outside a world of WORLD_SIZE=2 processes (ranks 0 to 1); unset RANK, WORLD_SIZE "
        "and LOCAL_RANK for one process, or start the job with torchrun"]
    assert time.monotonic() - start < 60
