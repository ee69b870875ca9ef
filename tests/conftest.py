import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from llama.testing import write_tiny_checkpoint
from llama.assets import SENTENCEPIECE_32K, fetch_wheel_file

REPO = Path(__file__).resolve().parent.parent

# Tests compare configurations against each other and against fp32 references, so the
# engine's default dtype (bf16 on CPUs with native bf16) is pinned to fp32 here; this
# also reaches the torchrun workers the tests launch. Tests of bf16 ask for it explicitly.
os.environ["LLAMA_DTYPE"] = "fp32"


@pytest.fixture(scope="session")
def sp_tokenizer() -> str:
    """Mistral's real 32k sentencepiece model, of the Llama 2 kind."""
    return str(fetch_wheel_file(*SENTENCEPIECE_32K))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random model in Meta's layout, one shard."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny1"), n_shards=1)


@pytest.fixture(scope="session")
def tiny_ckpt_mp2(tmp_path_factory) -> Path:
    """The same weights split into two shards along Meta's axes."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny2"), n_shards=2)


@pytest.fixture(scope="session")
def generator(tiny_ckpt, sp_tokenizer):
    from llama import Llama
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Llama.build seeds the global RNG and sampling draws from it; every test leaves it
    as it found it, so no test's draws depend on which tests ran before."""
    import torch

    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(autouse=True)
def _no_tokenizer_threads_warning():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


# ---- loaded weights vs the checkpoint -----------------------------------------------------

# A tiny model whose every split dimension divides by 4 (heads 8, kv heads 4, dim 128, ffn
# hidden 352, vocab 32000 as the sentencepiece tokenizer), so 1, 2 and 4 shards all work.
SPLIT4_PARAMS = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=32000,
                     multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)

# Meta's split axes, written out here independently of llama.checkpoint.
_COLUMN = ("wq", "wk", "wv", "w1", "w3")
_ROW = ("wo", "w2")


def meta_split_axis(name: str, vocab_split: bool):
    """The axis Meta's checkpoints split `name` along (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 0 if vocab_split else 1
    if name == "output.weight":
        return 0
    leaf = name.split(".")[-2]
    return 0 if leaf in _COLUMN else 1 if leaf in _ROW else None


def expected_rank_weights(ckpt_dir, vocab_split: bool, local_shapes: dict, mp_rank: int,
                          mp_size: int, dtype) -> dict:
    """This rank's weights as they must be loaded: every shard read in full, pieces joined
    along Meta's axes, the rank's slice cut along the axis on which its local shape is
    smaller than the full weight, cast to `dtype`."""
    import torch

    shards = sorted(Path(ckpt_dir).glob("consolidated.*.pth"))
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
    expected = {}
    for name, local in local_shapes.items():
        pieces = [s[name] for s in states]
        axis = meta_split_axis(name, vocab_split)
        full = pieces[0] if axis is None or len(pieces) == 1 else torch.cat(pieces, dim=axis)
        cut = [d for d, (a, b) in enumerate(zip(full.shape, local)) if a != b]
        assert len(cut) <= 1 and (not cut or full.shape[cut[0]] == local[cut[0]] * mp_size), (name, local)
        mine = full.chunk(mp_size, dim=cut[0])[mp_rank] if cut else full
        expected[name] = mine.to(dtype)
    return expected


@contextlib.contextmanager
def spy_on_torch_load() -> Iterator[List[str]]:
    """Within the block, the names of the files torch.load opens, in order."""
    import torch

    real_load, opened = torch.load, []

    def load(f, *args, **kwargs):
        opened.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    torch.load = load
    try:
        yield opened
    finally:
        torch.load = real_load


def wrong_weights(model, expected: dict) -> list:
    """Names of the model's parameters that differ from `expected` in dtype, shape or any bit."""
    import torch

    state = model.state_dict()
    assert set(state) == set(expected), set(state) ^ set(expected)
    return [name for name, value in state.items()
            if value.dtype != expected[name].dtype or not torch.equal(value, expected[name])]


# ---- real multi-process runs ----------------------------------------------------------------

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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
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
