import os
from pathlib import Path

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
