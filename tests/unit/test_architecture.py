"""The shape of the package: which modules exist at the top, which parts of the package may
import which (every import counted, inside functions too), every module imports alone, and
factories that run each constructor once."""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from llama.chat_format import ChatFormat, ChatMLFormat, Llama2ChatFormat, Llama3ChatFormat
from llama.tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer
from llama.utils.assets import LLAMA3_TOKENIZER, fetch_wheel_file

PACKAGE = Path(__file__).resolve().parents[2] / "llama"

# The top level holds the public API and the commands, nothing else.
PUBLIC_API = {"__init__", "errors", "settings", "generation", "tokenizer", "tool_calls", "chat_format", "infilling",
              "detokenize"}
COMMANDS = {"cli", "chat", "batch", "convert", "demo", "tune", "testing", "serve"}
SUBPACKAGES = {"utils", "native", "model", "checkpoint", "runtime", "serve"}

# What each part may import (besides itself), in the order of the data flow: a part may use
# those listed before it and never one after it.
BELOW = {
    "errors": set(),
    "settings": {"errors"},
    "utils": {"errors", "settings"},
    "native": {"errors", "settings", "utils"},
    "tokenizer": {"errors", "utils"},
    "tool_calls": {"errors"},
    "chat_format": {"errors", "utils", "tokenizer", "tool_calls"},
    "infilling": {"errors", "tokenizer"},
    "detokenize": {"tokenizer"},
    "model": {"errors", "settings", "utils", "native"},
    "checkpoint": {"errors", "settings", "utils", "model", "tokenizer"},
    "runtime": {"errors", "settings", "utils", "native", "model", "checkpoint", "tokenizer", "chat_format"},
    "generation": {"errors", "utils", "model", "runtime", "tokenizer", "tool_calls", "chat_format", "infilling",
                   "detokenize"},
    "cli": {"errors", "utils", "checkpoint", "runtime", "generation"},
    "demo": {"checkpoint", "cli"},
    "testing": {"errors", "utils", "model", "checkpoint", "cli"},
    "convert": {"checkpoint", "cli"},
    "tune": {"errors", "utils", "native", "model", "checkpoint", "cli"},
    "chat": {"errors", "utils", "runtime", "generation", "chat_format", "cli"},
    "batch": {"errors", "utils", "runtime", "generation", "chat_format", "detokenize", "cli"},
    "serve": {"errors", "settings", "utils", "checkpoint", "runtime", "generation", "tokenizer", "tool_calls",
              "chat_format", "detokenize", "cli"},
    "__init__": {"errors", "generation", "tokenizer", "chat_format", "model"},
}
# Imports against the flow, each with its reason. Meta's Llama 3 code writes
# `from llama.tokenizer import ChatFormat`: the tokenizer module hands it over when asked.
EXCEPTIONS = {("tokenizer", "chat_format"): "Meta's `from llama.tokenizer import ChatFormat`"}


def part_of(module: str) -> str:
    """The part of the package a module belongs to: its top-level name ("llama.model.cache" -> "model")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path) -> Iterator[Tuple[str, int]]:
    """(module of the package, line) for every import in `path`, at any depth: module level,
    inside functions, under `if TYPE_CHECKING`."""
    this = module_name(path, package)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package.name:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this.split(".")[: len(this.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package.name:
                continue
            if node.module is None or not node.level:  # from . import x: x may be a module
                for alias in node.names:
                    yield (f"{target}.{alias.name}" if (package.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists()
                           or (package.parent / Path(*f"{target}.{alias.name}".split("."))).is_dir() else target), node.lineno
            else:
                yield target, node.lineno


def wrong_imports(package: Path) -> list:
    """Every import from one part of the package into a part it may not use."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        source = part_of(module_name(path, package))
        for target, line in imports_of(path, package):
            dest = part_of(target)
            if dest != source and dest not in BELOW.get(source, set()) and (source, dest) not in EXCEPTIONS:
                wrong.append(f"{path.relative_to(package.parent)}:{line} imports {target} ({source} -> {dest})")
    return wrong


def test_the_top_level_holds_the_public_api_and_the_commands_only():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules <= PUBLIC_API | COMMANDS, modules - PUBLIC_API - COMMANDS
    assert folders == SUBPACKAGES
    assert set(BELOW) == PUBLIC_API | COMMANDS | SUBPACKAGES


def test_imports_follow_the_data_flow():
    """The allowed table itself points one way: each part's imports come before it."""
    order = list(BELOW)
    for part, allowed in BELOW.items():
        later = {a for a in allowed if order.index(a) > order.index(part) and (part, a) not in EXCEPTIONS}
        assert not later, f"{part} may import {later}, which come after it"
    assert wrong_imports(PACKAGE) == []


def test_the_import_check_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "llama"
    (package / "native").mkdir(parents=True)
    (package / "runtime").mkdir()
    for folder in (package, package / "native", package / "runtime"):
        (folder / "__init__.py").write_text("")
    (package / "runtime" / "engine.py").write_text("x = 1\n")
    (package / "native" / "decode.py").write_text("def f():\n    from ..runtime import engine\n")
    (package / "native" / "build.py").write_text("from llama.runtime.engine import x\n")
    (package / "runtime" / "backend.py").write_text("from ..native import decode\n")  # allowed
    wrong = wrong_imports(package)
    assert [w.split(" ")[0] for w in wrong] == ["llama/native/build.py:1", "llama/native/decode.py:2"]


MODULES = sorted(module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")

# Forks of an interpreter that has imported the heavy dependencies but nothing of llama: each
# child imports one llama module first, as a fresh interpreter would (and in a few ms).
IMPORT_EACH_ALONE = r"""
import importlib, os, sys, traceback
import torch, fairscale, sentencepiece, tiktoken, tokenizers  # noqa: F401
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(name, os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.skipif(not hasattr(sys.modules["os"], "fork"), reason="needs os.fork")
@pytest.mark.subprocess
@pytest.mark.slow
def test_every_module_imports_alone():
    assert "llama.runtime.loading" in MODULES and len(MODULES) > 40
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
    results = dict(line.split() for line in done.stdout.splitlines())
    assert results == {name: "0" for name in MODULES}, done.stderr[-4000:]


def _count_inits(monkeypatch, classes) -> list:
    calls = []
    for cls in classes:
        original = cls.__init__

        def counted(self, *args, _original=original, **kwargs):
            calls.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    return calls


def test_tokenizer_and_chat_format_factories_run_init_once(monkeypatch, sp_tokenizer):
    calls = _count_inits(monkeypatch, [SentencePieceTokenizer, TiktokenTokenizer, HFTokenizer,
                                       Llama2ChatFormat, Llama3ChatFormat, ChatMLFormat])
    sp = Tokenizer(sp_tokenizer)
    assert type(sp) is SentencePieceTokenizer and calls == ["SentencePieceTokenizer"]
    calls.clear()
    llama3 = fetch_wheel_file(*LLAMA3_TOKENIZER)
    assert type(load_tokenizer(llama3)) is TiktokenTokenizer and calls == ["TiktokenTokenizer"]
    calls.clear()
    assert type(ChatFormat(sp)) is Llama2ChatFormat and calls == ["Llama2ChatFormat"]
    from llama.tokenizer import ChatFormat as MetaStyleImport  # Meta's Llama 3 scripts import it here

    assert MetaStyleImport is ChatFormat


def test_every_mutant_of_tools_mutate_still_applies_and_names_existing_tests():
    """tools/mutate.py edits one spot per mutant: when the code it names moves, the mutant must
    move with it (a stale one would stop the whole run before it starts)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "mutate.py"
    spec = importlib.util.spec_from_file_location("mutate_tool", path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["mutate_tool"] = tool  # dataclasses look their module up
    try:
        spec.loader.exec_module(tool)
        repo = path.parents[1]
        for mutant in tool.MUTATIONS:
            tool._apply((repo / mutant.path).read_text(), mutant)  # raises naming a stale mutant
            for test_file in mutant.tests:
                assert (repo / test_file).is_file(), f"{mutant.name}: no {test_file}"
    finally:
        sys.modules.pop("mutate_tool", None)
