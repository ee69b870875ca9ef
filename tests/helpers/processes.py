"""Real processes: several started together, free ports, torchrun jobs on CPU ranks over gloo."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from . import REPO


def choices_of_processes_starting_together(target, args_per_process: list, timeout_s: float = 120) -> list:
    """Start one spawned process per args tuple at once, each called as target(*args, barrier,
    queue) with a barrier of them all and a queue for its one result; wait for them and return
    the results (fork would inherit torch's thread pool and hang)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out, barrier = context.Queue(), context.Barrier(len(args_per_process))
    procs = [context.Process(target=target, args=(*args, barrier, out)) for args in args_per_process]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout_s)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    return [out.get(timeout=5) for _ in procs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, args: list, timeout_s: float, nproc: int = 2,
                 logs: Optional[Path] = None, **env_extra: str) -> dict:
    """Run `script` under torchrun on `nproc` CPU ranks over gloo, in its own session (a hang
    is ended with all its workers). Returns rc, elapsed seconds, stdout, stderr and, with
    `logs`, each rank's stderr (torchrun --redirects); None for rc if it ran past timeout_s."""
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if logs is not None:
        cmd += ["--log-dir", str(logs), "--redirects", "3"]
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, str(script), *map(str, args)], cwd=str(REPO), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    ranks = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")} if logs else {}
    return {"rc": rc, "elapsed": time.monotonic() - start, "stdout": stdout, "stderr": stderr,
            "ranks": ranks}
