"""The docs say what is true: the README's Quick start runs as written on a fresh environment,
every `python -m llama.X` command they name answers --help, the settings table is the
registry's, every LLAMA_* variable the package reads is registered, and every relative link
points at a file that exists."""

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from helpers import REPO
from helpers.processes import free_port
from llama import settings

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def bash_blocks(markdown: str) -> list:
    """The ```bash blocks of a markdown text, in order."""
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def quick_start() -> list:
    """The commands of the README's Quick start section."""
    section = _text(REPO / "README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in bash_blocks(section)]


def test_readme_is_short_and_indexes_every_docs_page():
    readme = _text(REPO / "README.md")
    assert len(readme.splitlines()) <= 200
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert pages and pages <= linked, f"pages the README does not index: {pages - linked}"


def test_every_relative_link_points_at_a_file():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text(doc)):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []


def test_settings_table_is_the_registry():
    text = _text(REPO / "docs" / "development.md")
    table = text.split("<!-- settings: begin (python -m llama.settings) -->\n", 1)[1].split("<!-- settings: end -->")[0]
    assert table == settings.markdown_table()
    printed = subprocess.run([sys.executable, "-m", "llama.settings"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert printed.returncode == 0 and printed.stdout == table


def test_serving_field_table_is_the_servers():
    """docs/serving.md's table of request fields is llama.serve.protocol.FIELDS."""
    from llama.serve.protocol import fields_table

    text = _text(REPO / "docs" / "serving.md")
    table = text.split("<!-- fields: begin (llama.serve.protocol.fields_table) -->\n", 1)[1]
    assert table.split("<!-- fields: end -->")[0] == fields_table()


def test_every_llama_variable_the_package_reads_is_registered():
    """Every LLAMA_* name in the package's Python code is a registered setting, and only
    llama/settings.py reads the environment for them."""
    named, direct = set(), []
    for path in (REPO / "llama").rglob("*.py"):
        code = _text(path)
        named |= set(re.findall(r"\bLLAMA_[A-Z_]+\b", code))
        if path.name != "settings.py" and re.search(r"environ(\.get)?\(?\[?[\"']LLAMA_", code):
            direct.append(str(path.relative_to(REPO)))
    assert named <= set(settings.SETTINGS), named - set(settings.SETTINGS)
    assert direct == []


def test_every_setting_is_parsed_and_a_bad_value_names_the_variable(monkeypatch):
    from llama import LlamaError

    for name, setting in settings.SETTINGS.items():
        monkeypatch.delenv(name, raising=False)
        settings.get(name)  # the default parses
    for name, bad in [("LLAMA_NATIVE", "yes"), ("LLAMA_TUNE", "2"), ("LLAMA_PROGRESS", "on"),
                      ("LLAMA_DTYPE", "int8"), ("LLAMA_DIST_TIMEOUT", "inf")]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(LlamaError, match=rf"{name}='{bad}'"):
            settings.get(name)


def documented_modules() -> list:
    """Every `llama.X` that the README and docs run with `python -m` (or `torchrun -m`)."""
    found = set()
    for doc in DOCS:
        found |= set(re.findall(r"-m (llama(?:\.[a-z_]+)+)\b", _text(doc)))
    return sorted(found)


def documented_flags(module: str) -> list:
    """(flag, value or None, the line) for every flag that a docs command of `module` shows,
    usage lines (`[--top_p 0.9]`) and continuation lines included."""
    found = []
    for doc in DOCS:
        for block in bash_blocks(_text(doc)):
            command = None
            for line in block.splitlines():
                started = re.search(rf"-m {re.escape(module)}(\s|$)", line)
                if started:
                    command = line
                elif not (command and line.startswith(" ") and line.strip().startswith("[")):
                    command = None
                    continue
                text = line[started.end():] if started else line
                for flag, value in re.findall(r"--([\w-]+)(?:[ =]([^\s\]\[]+))?", text.split("#")[0]):
                    found.append((flag.replace("-", "_"), value or None, line.strip()))
    return found


@pytest.mark.subprocess
@pytest.mark.parametrize("module", documented_modules())
def test_every_documented_command_answers_help(module):
    """--help answers, and every flag the docs show for the command is one of its flags; a
    number the docs show beside a flag in a usage line is its default."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PAGER": "cat"})
    shown = done.stdout + done.stderr  # fire writes help to stderr when it is not a terminal
    assert done.returncode == 0 and "Traceback" not in shown, shown[-2000:]
    assert "FLAGS" in shown or "usage" in shown.lower(), shown[-2000:]
    assert "Optional[Optional]" not in shown  # types readable: `Optional[str]`
    if "FLAGS" not in shown:
        return
    # flag -> (its Default, its help text), e.g. "max_connections" -> ("None", "... (default: 1024, ...")
    flags = {name: (default, about) for name, default, about in
             re.findall(r"--(\w+)=\w+\n\s+Type: .*\n\s+Default: (.*)\n\s+(.*)", shown)}
    # positional arguments, which fire also takes as flags (`--input FILE`)
    flags.update({name.lower(): ("", "") for name in re.findall(r"^    ([A-Z_]+)\n\s+Type:", shown, re.M)})
    for flag, value, line in documented_flags(module):
        assert flag in flags, f"the docs show --{flag} for {module}, which has no such flag: {line}"
        default, about = flags[flag]
        if value is not None and re.fullmatch(r"\d+(\.\d+)?", value) and "[" in line:  # a usage line's number
            said = re.search(r"default: ([\d.]+)", about)
            assert float(value) == float(said.group(1) if default == "None" and said else default), \
                f"{line}: --{flag}'s default is {default} ({about})"


def test_documented_commands_are_found():
    modules = documented_modules()
    assert {"llama.chat", "llama.batch", "llama.serve", "llama.convert", "llama.demo", "llama.tune"} <= set(modules)


def test_quick_start_test_command_is_ci():
    """The second Quick-start command is the one CI runs; it cannot run inside the suite it
    starts, so what it runs is checked: .ci/run installs from the project's files and runs the
    test command the development docs give."""
    setup, tests = quick_start()
    assert tests == "bash .ci/run"
    ci = _text(REPO / ".ci" / "run")
    assert "pip install -q -e '.[test]'" in ci
    command = re.search(r"^(LLAMA_TEST_NO_SKIPS=1 python -m pytest .*)$", ci, re.M).group(1)
    assert command in _text(REPO / "docs" / "development.md")


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_start_runs_as_written(tmp_path):
    """The first Quick-start command, as written, in a new virtual environment (it sees this
    machine's packages, so pip fetches nothing): install, fetch the demo model, chat."""
    command = quick_start()[0]
    assert command.startswith("pip install torch==2.13.0 -e . && ./download.sh demo && python ")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    # The machine's pip and setuptools, installing into the new environment (a venv's own
    # setuptools would be Python's bundled one, too old to build without `wheel`).
    pip = env_dir / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{env_dir / "bin" / "python"}" -m pip "$@"\n')
    pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_DTYPE", "PYTHONPATH", "RANK", "WORLD_SIZE")}
    # pip: nothing from an index, and the machine's setuptools to build the editable install.
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir), PIP_NO_INDEX="1",
               PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert done.stdout.count("> Assistant:") == 3, done.stdout[-3000:]
    # The README promises a right answer: the first dialog's answer names Paris.
    first = done.stdout.split("What is the capital of France?", 1)[1].split("> Assistant:", 1)[1]
    assert "Paris" in first.split("=====", 1)[0], done.stdout[-3000:]


@pytest.mark.torchrun
@pytest.mark.slow
def test_the_documented_torchrun_example_runs_on_the_demo_model():
    """docs/distributed.md's command for a fresh machine, as written: three ranks on the demo
    model print the three answers once, the first naming Paris as one process's does. (Not
    compared token for token: in bf16 a split sum may round differently.)"""
    command = next(line for line in _text(REPO / "docs" / "distributed.md").splitlines()
                   if line.startswith("torchrun") and "--ckpt_dir" not in line)
    assert command == "torchrun --nproc_per_node 3 example_chat_completion.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LLAMA_DTYPE")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    port = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", *port, *command.split()[1:],
                            "--max_gen_len", "24"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    answers = [line for line in ranks.stdout.splitlines() if line.startswith("> Assistant:")]
    assert len(answers) == 3 and "Paris" in answers[0], ranks.stdout[-3000:]


def test_every_readme_claim_names_a_test_that_exists():
    """docs/development.md's table of the README's claims: each names a test function that is
    in the suite (a renamed or deleted test would leave a claim unguarded)."""
    text = _text(REPO / "docs" / "development.md")
    table = text.split("<!-- claims: begin -->", 1)[1].split("<!-- claims: end -->", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(named) >= 20
    for path, function in named:
        code = _text(REPO / path)
        assert re.search(rf"^def {function}\(", code, re.MULTILINE), f"{path}::{function} does not exist"
