"""Foreign checkpoints to Meta's layout (`python -m llama.convert SRC DST` is the command).

SRC is an HF model directory (hf.py) or a .gguf file (gguf.py). DST becomes a directory
holding exactly what Llama.build needs: consolidated.NN.pth shards, params.json (with the
chat format recorded) and the tokenizer file. Nothing a user has is lost or overwritten:
the result appears under DST only complete, and only an earlier output of this converter
is ever replaced.
"""

import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Union

from ...errors import LlamaError
from ...model.args import DTYPES, ModelArgs
from ...utils.checks import whole_number
from ...utils.locking import hold
from ..layout import check_divisible, check_weights_fit, save_checkpoint
from .gguf import convert_gguf
from .hf import convert_hf

# Written into every folder llama.convert makes: what --force may replace, and what a
# leftover of an interrupted run may be removed by.
MARKER = ".llama-convert.json"


def convert(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], model_parallel_size: int = 1,
            dtype: str = "bf16", force: bool = False, quiet: bool = False) -> Path:
    """Convert SRC (HF directory or .gguf file) into a Meta-layout checkpoint at DST.

    The result is written to a sibling folder `.DST.partial-*` and renamed into place only
    when complete, under a lock (`.DST.lock`) that makes concurrent conversions into DST
    take turns; leftovers of a killed run are removed first (with a message unless quiet).
    With force, DST may be replaced only if it is an earlier output of llama.convert (it
    holds MARKER and nothing else); a folder that is or holds SRC is never replaced.
    """
    source, target = _path_arg(src, "SRC"), _path_arg(dst, "DST")
    if dtype not in DTYPES:
        raise LlamaError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    whole_number(model_parallel_size, "--model_parallel_size", low=1)
    if not source.exists():
        raise LlamaError(f"source {str(src)!r} does not exist; give an HF model directory or a .gguf file")
    if not source.is_dir() and source.suffix != ".gguf":
        raise LlamaError(f"source {str(src)!r} is neither a directory nor a .gguf file")
    _check_destination(source, target, force)  # before the lock: a refusal leaves no trace
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamaError(f"cannot create the folder {str(target.parent)!r} for DST ({exc.strerror or exc})") from None
    with hold(target, f"the conversion into {str(dst)!r}", quiet=quiet):
        _remove_leftovers(target, quiet)
        _check_destination(source, target, force)  # again: another process may have written it
        work = _new_work_dir(target)
        try:
            weights, params = _written(lambda: convert_hf(source, work) if source.is_dir()
                                       else convert_gguf(source, work), dst)
            check_weights_fit(weights, params, str(src))
            check_divisible(ModelArgs.from_params(params), model_parallel_size, "convert")
            # Tied weights stay one tensor. Keying on id() is safe here: every tensor stays alive in
            # `weights` throughout, so no id can be reused (unlike the address of a freed temporary).
            cast = {id(v): v.to(DTYPES[dtype]) for v in weights.values()}
            weights = {k: cast[id(v)] for k, v in weights.items()}
            _written(lambda: save_checkpoint(weights, params, str(work), model_parallel_size), dst)
            _written(lambda: _write_marker(work, {"source": str(source.resolve()),
                                                  "files": sorted(p.name for p in work.iterdir())}), dst)
            _move_into_place(work, target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return target


def _written(write, dst) -> object:
    """write()'s result, or a LlamaError when the disk (or a quota, or a file-size limit) takes
    no more: nothing of the conversion is kept, and DST is as it was. torch.save reports a
    failed write as a RuntimeError of its stream."""
    try:
        return write()
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "error" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LlamaError(f"cannot write the conversion into {str(dst)!r} ({reason}); nothing of it was kept "
                         f"and DST is as it was: make room (or raise the file-size limit) and run it again") from None


def _path_arg(value, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise LlamaError(f"{name} must be a file or folder name, got {value!r}")
    return Path(value)


def _check_destination(source: Path, target: Path, force: bool) -> None:
    """LlamaError unless writing the conversion at `target` loses nothing: DST is new, empty,
    or (with force) an earlier output of llama.convert holding nothing else; never SRC or a
    folder holding SRC, never a link, never a file."""
    if target.is_symlink():
        raise LlamaError(f"destination {str(target)!r} is a symbolic link; give a new folder path")
    if target.resolve() == source.resolve() or target.resolve() in source.resolve().parents:
        raise LlamaError(f"destination {str(target)!r} is the source {str(source)!r} or a folder holding it; "
                         f"converting there would replace the source: give a new folder path")
    if not target.exists():
        return
    if not target.is_dir():
        raise LlamaError(f"destination {str(target)!r} is a file, not a folder; give a new folder path")
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return
    if not force:
        raise LlamaError(f"destination {str(target)!r} exists and is not empty; choose another path, or "
                         f"pass --force to replace an earlier output of llama.convert")
    written = _marker(target).get("files")
    if not isinstance(written, list):
        raise LlamaError(f"--force: {str(target)!r} was not written by llama.convert (it has no complete "
                         f"{MARKER}), so it is not replaced; move it away or choose another path")
    foreign = [name for name in present if name not in written and name != MARKER]
    if foreign:
        raise LlamaError(f"--force: {str(target)!r} holds files llama.convert did not write "
                         f"({', '.join(foreign[:5])}); nothing was changed: move them away first")


def _marker(folder: Path) -> dict:
    """The MARKER of `folder` ({} if absent or unreadable)."""
    try:
        value = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_marker(folder: Path, fields: dict) -> None:
    text = json.dumps({"written_by": "llama.convert", **fields}, indent=2) + "\n"
    (folder / MARKER).write_text(text, encoding="utf-8")


def _new_work_dir(target: Path) -> Path:
    """A new `.DST.partial-*` folder beside target, created with the user's umask (not
    mkdtemp's 0700) and marked as ours at once."""
    while True:
        work = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
        try:
            work.mkdir()
        except FileExistsError:
            continue
        _write_marker(work, {"complete": False})
        return work


def _remove_leftovers(target: Path, quiet: bool) -> None:
    """Delete the `.DST.partial-*` / `.DST.old-*` folders of a conversion that was killed.
    Only folders that are empty or carry MARKER go: we made those (and hold the lock, so
    no live conversion is using them)."""
    for leftover in sorted(target.parent.glob(f".{target.name}.partial-*")) + \
            sorted(target.parent.glob(f".{target.name}.old-*")):
        if leftover.is_symlink() or not leftover.is_dir():
            continue
        if any(leftover.iterdir()) and not (leftover / MARKER).is_file():
            continue
        size = sum(p.stat().st_size for p in leftover.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(leftover)
        if not quiet:
            print(f"removed {str(leftover)!r} ({size / 1e6:.0f} MB), left by an interrupted conversion",
                  file=sys.stderr, flush=True)


def _move_into_place(work: Path, target: Path) -> None:
    """Rename the finished work folder to target, replacing an (empty or earlier) output."""
    if not target.exists():
        work.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    target.rename(old)
    work.rename(target)
    shutil.rmtree(old)
