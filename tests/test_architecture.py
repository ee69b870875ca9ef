"""The shape of the package: every module imports alone, no import cycle, and factories
that run each constructor once."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llama.assets import LLAMA3_TOKENIZER, fetch_wheel_file
from llama.chat_format import ChatFormat, ChatMLFormat, Llama2ChatFormat, Llama3ChatFormat
from llama.tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

PACKAGE = Path(__file__).resolve().parent.parent / "llama"
MODULES = sorted(f"llama.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")

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
def test_every_module_imports_alone():
    assert "llama.loading" in MODULES and len(MODULES) > 20
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
    results = dict(line.split() for line in done.stdout.splitlines())
    assert results == {name: "0" for name in MODULES}, done.stderr[-4000:]


def module_level_imports(package: Path, path: Path) -> set:
    """The modules of `package` that `path` imports when it is imported (not inside
    functions, not under `if TYPE_CHECKING:`)."""
    found = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", [])
                      + [s for h in getattr(node, "handlers", []) for s in h.body])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:  # from .x import y
                    found.add(node.module.split(".")[0])
                else:  # from . import x, y
                    found.update(a.name for a in node.names if (package / f"{a.name}.py").exists())
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found.update(n.split(".")[1] for n in names if n.startswith(f"{package.name}."))

    visit(ast.parse(path.read_text()).body)
    return found - {path.stem}


def import_cycles(package: Path) -> list:
    """Every cycle of module-level imports among the modules of `package`, as a list of names."""
    graph = {p.stem: module_level_imports(package, p) for p in package.glob("*.py") if p.stem != "__init__"}
    cycles = []

    def walk(path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            else:
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    assert "tokenizer" in module_level_imports(PACKAGE, PACKAGE / "chat_format.py")  # formats use tokenizers
    assert import_cycles(PACKAGE) == []


def test_the_cycle_check_sees_cycles(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("import os\nfrom . import c\n")
    (package / "c.py").write_text("try:\n    from pkg.a import y\nexcept ImportError:\n    pass\n")
    (package / "d.py").write_text("def f():\n    from . import a\n")  # inside a function: fine
    assert sorted(map(tuple, import_cycles(package)))[0] == ("a", "b", "c", "a")


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
