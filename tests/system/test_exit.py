"""A torchrun job whose processes finish at different times exits 0 on every rank.

Without leaving the process group before interpreter shutdown, a process whose peers are
still at work aborted at exit ("terminate called without an active exception", exit -6)
in 7 of 8 runs of this worker, failing a job whose every result was written."""

import pytest

from helpers import REPO
from helpers.processes import run_torchrun

WORKER = REPO / "tests" / "helpers" / "workers" / "exit_worker.py"


@pytest.mark.torchrun
@pytest.mark.slow
def test_replicas_that_finish_early_exit_cleanly():
    for attempt in range(2):  # the abort was not certain in one run
        job = run_torchrun(WORKER, [], timeout_s=180, nproc=4)
        assert job["rc"] == 0, f"run {attempt}: torchrun exit {job['rc']}\n{job['stderr'][-3000:]}"
        assert "terminate called" not in job["stderr"]
