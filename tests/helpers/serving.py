"""Running python -m llama.serve in tests: a real server process on a free localhost port."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from . import REPO
from .processes import free_port

KEY = "test-key-123"
MODEL = "tiny"
MAX_SEQ_LEN = 2048  # long answers take seconds: room to disconnect mid-stream


def start_server(ckpt: Path, tokenizer: str, *flags: str, nproc: int = 1, dtype: str = "fp32",
                 open_files: "int | None" = None) -> "tuple[subprocess.Popen, str]":
    """The server in its own process group (torchrun with nproc > 1); (process, base URL) once
    /health answers. open_files: its `ulimit -n` (soft and hard), if given."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LLAMA_API_KEY")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = [*launcher, "-m", "llama.serve", "--ckpt_dir", str(ckpt), "--tokenizer_path", tokenizer,
           "--port", str(port), "--dtype", dtype, "--api-key", KEY, "--model_name", MODEL, *flags]
    def limit() -> None:
        if open_files is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.communicate()[1][-3000:]}")
        try:
            if httpx.get(f"{url}/health", headers=auth(), timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"server did not answer within 90 s: {proc.communicate()[1][-3000:]}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 40) -> "tuple[int, str]":
    """SIGTERM (what torchrun and service managers send); (exit status, stderr). Killed if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"server did not stop within {timeout_s} s of SIGTERM: {stderr[-3000:]}")
    return proc.returncode, stderr


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}
