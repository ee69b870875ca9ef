"""Scripts written for Meta's llama, llama3 and codellama repositories run against this
package: tests/meta_examples/ holds scripts that make exactly the calls of Meta's example
scripts (see its README for why they are not Meta's files), run as a user runs them — plain
python on a one-shard checkpoint, torchrun with two processes on a two-shard one (Meta's
layout for two ranks) — on tiny checkpoints of each family, in the default dtype."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from helpers.processes import run_torchrun

EXAMPLES = Path(__file__).resolve().parent / "meta_examples"
SEPARATOR = "\n==================================\n"
UNSAFE = "> Assistant: Error: special tags are not allowed as part of the prompt."

# script -> (checkpoint kind, number of results it prints)
SCRIPTS = {
    "llama2_text_completion.py": ("llama2", 3),
    "llama2_chat_completion.py": ("llama2", 5),
    "llama3_text_completion.py": ("llama3", 4),
    "llama3_chat_completion.py": ("llama3", 4),
    "codellama_completion.py": ("codellama", 2),
    "codellama_infilling.py": ("codellama", 3),
    "codellama_instructions.py": ("codellama", 2),
}
FLAGS = ["--max_gen_len", "6"]  # short answers keep the runs quick; every other flag is the script's default


def run_python(script: Path, args: list) -> dict:
    env = {**os.environ, "LLAMA_DTYPE": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(script), *args], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def check_output(script: str, stdout: str, count: int) -> None:
    if script == "codellama_infilling.py":
        blocks = stdout.split("\n================= Prompt text =================\n\n")[1:]
        assert len(blocks) == count, stdout
        for block in blocks:
            prompt, filled = block.split("\n\n================= Filled text =================\n\n")
            prefix, suffix = prompt.split("<FILL>")
            assert filled.startswith(prefix) and filled[:-1].endswith(suffix), block  # print() added "\n"
        return
    assert stdout.count(SEPARATOR) == count, stdout
    answers = re.findall(r"^> (?:Assistant: )?", stdout, re.MULTILINE)
    assert len(answers) == count, stdout
    if script == "llama2_chat_completion.py":
        assert stdout.count(UNSAFE) == 1, stdout


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.torchrun
def test_meta_example_runs_unchanged(family_ckpt, script, launcher):
    kind, count = SCRIPTS[script]
    ckpt = family_ckpt(kind, 1 if launcher == "python" else 2)
    args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"), *FLAGS]
    if launcher == "python":
        job = run_python(EXAMPLES / script, args)
    else:
        job = run_torchrun(EXAMPLES / script, args, timeout_s=240, LLAMA_DTYPE="", LLAMA_DIST_TIMEOUT="120")
    logs = f"exit {job['rc']}\nstdout:\n{job['stdout'][-3000:]}\nstderr:\n{job['stderr'][-3000:]}"
    assert job["rc"] == 0, logs
    assert "Traceback" not in job["stderr"], logs
    assert job["stdout"].count("Loaded in ") == 1, logs  # one rank prints
    check_output(script, job["stdout"], count)
