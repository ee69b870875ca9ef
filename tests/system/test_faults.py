"""Faults: a failing, killed or hung rank ends the whole torchrun job quickly with the cause
on rank 0's stderr; download.sh never takes a partial file for a complete one; conversion
never leaves a half-written checkpoint behind."""

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from helpers import REPO
from helpers.download_server import BAD_SIGNATURE, FakeS3, make_tree, run_download_sh
from helpers.processes import run_torchrun
from llama.testing import TINY_PARAMS, random_meta_weights, write_tiny_checkpoint

WORKER = REPO / "tests" / "helpers" / "workers" / "fault_worker.py"
JOB_LIMIT_S = 60  # the whole job must be over by then


@pytest.fixture(scope="module")
def bad_copy(tmp_path_factory, tiny_ckpt_mp2) -> Path:
    """The two-shard checkpoint with consolidated.01.pth cut in half (an interrupted copy)."""
    bad = tmp_path_factory.mktemp("bad") / "ckpt"
    shutil.copytree(tiny_ckpt_mp2, bad)
    shard = bad / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return bad


# Each case: the script torchrun runs, the environment of the fault, what rank 0 must say
# (None: torchrun may end it before it can say anything), what torchrun's summary must show.
SHARD_01 = r"cannot read checkpoint shard '[^']*consolidated\.01\.pth': it is truncated or corrupted"
FAULTS = {
    # Only rank 1 opens shard 01 (each rank reads only its own shard); rank 0 names its failure.
    "corrupted_shard_01": dict(worker="example", env={},
                               rank0=rf"^error: rank 1 failed while loading the checkpoint: {SHARD_01}",
                               summary=r"exitcode\s*:\s*1"),
    # Only rank 1 reads a bad copy (say, a node with its own damaged download).
    "bad_shard_on_rank1_only": dict(worker="fault", env={"FAULT_RANK1_CKPT": "{bad}"},
                                    rank0=rf"^error: rank 1 failed while loading the checkpoint: {SHARD_01}",
                                    summary=r"exitcode\s*:\s*1"),
    # Rank 1 fails making the model, after the checkpoint stage everyone agreed on: every rank
    # must meet it at the same agreement (one per stage, none nested) and end with its cause.
    "rank1_out_of_memory_building": dict(worker="fault", env={"FAULT_OOM_RANK": "1"},
                                         rank0=r"^error: rank 1 failed while building the model: MemoryError: "
                                               r"no room for the model \(injected\)",
                                         summary=r"exitcode\s*:\s*1"),
    # Rank 1 dies abruptly in the middle of generating.
    "rank1_killed_mid_generation": dict(worker="fault", env={"FAULT_KILL_RANK": "1", "FAULT_KILL_AFTER": "3"},
                                        rank0=None, summary=r"local_rank: 1\)\s*\n\s*exitcode\s*:\s*9"),
    # Rank 1 never finishes making the model: rank 0 names the stage once its wait for slow
    # ranks (LLAMA_DIST_TIMEOUT plus the reading time allowed for a rank's share) is over.
    "rank1_hangs_building": dict(worker="fault", env={"FAULT_SLOW_BUILD_RANK": "1", "FAULT_SLOW_BUILD_S": "3600",
                                                      "FAULT_READ_BYTES_PER_S": "1e9", "LLAMA_DIST_TIMEOUT": "5"},
                                 rank0=r"^error: not every rank finished building the model within 5 s",
                                 summary=r"exitcode\s*:\s*1"),
    # Rank 1 stays alive but never joins the next collective: the timeout ends the job.
    "rank1_hangs": dict(worker="fault", env={"FAULT_HANG_RANK": "1", "LLAMA_DIST_TIMEOUT": "5"},
                        rank0=r"^error: lost contact with the other processes of this job \(.*Timed out",
                        summary=r"exitcode\s*:\s*1"),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.torchrun
def test_failed_rank_ends_the_whole_job(fault, tiny_ckpt_mp2, bad_copy, sp_tokenizer, tmp_path):
    case = FAULTS[fault]
    env = {key: value.format(bad=bad_copy) for key, value in case["env"].items()}
    ckpt = bad_copy if fault == "corrupted_shard_01" else tiny_ckpt_mp2
    script = REPO / "example_text_completion.py" if case["worker"] == "example" else WORKER
    job = run_torchrun(script, ["--ckpt_dir", ckpt, "--tokenizer_path", sp_tokenizer], timeout_s=2 * JOB_LIMIT_S,
                       logs=tmp_path / "logs", **env)
    assert job["rc"] is not None, f"the torchrun job was still running after {2 * JOB_LIMIT_S}s:\n{job['stderr'][-4000:]}"

    print(f"{fault}: torchrun exited {job['rc']} after {job['elapsed']:.1f}s")
    assert job["rc"] != 0
    assert job["elapsed"] < JOB_LIMIT_S, f"the job took {job['elapsed']:.0f}s"
    assert re.search(case["summary"], job["stderr"]), job["stderr"][-3000:]
    rank0 = job["ranks"].get(0, "")
    assert "Traceback" not in rank0, rank0
    errors = [line for line in rank0.splitlines() if line.startswith("error:")]
    if case["rank0"] is not None:
        assert len(errors) == 1 and re.search(case["rank0"], errors[0]), rank0
    else:  # killed or not, rank 0 said at most one line, and not a traceback
        assert len(errors) <= 1, rank0


@pytest.mark.torchrun
@pytest.mark.slow
def test_a_rank_slower_to_load_than_the_timeout_is_waited_for(tiny_ckpt_mp2, sp_tokenizer, tmp_path):
    """Ranks load at their own disks' speed: rank 1 taking 12 s longer than rank 0 is no
    failure with LLAMA_DIST_TIMEOUT=5 when reading its share may take that long (here: the
    tiny model's 8 MB per rank at 0.5 MB/s, 16 s)."""
    env = {"FAULT_SLOW_BUILD_RANK": "1", "FAULT_SLOW_BUILD_S": "12", "FAULT_READ_BYTES_PER_S": "5e5",
           "LLAMA_DIST_TIMEOUT": "5"}
    job = run_torchrun(WORKER, ["--ckpt_dir", tiny_ckpt_mp2, "--tokenizer_path", sp_tokenizer], timeout_s=2 * JOB_LIMIT_S,
                       logs=tmp_path / "logs", **env)
    assert job["rc"] == 0, job["stderr"][-3000:] + "\n".join(job["ranks"].values())[-3000:]
    printed = {int(p.parent.name): p.read_text() for p in (tmp_path / "logs").rglob("stdout.log")}
    assert "rank 0 done" in printed[0] and job["elapsed"] > 12


# ---- download.sh: interrupted transfers -------------------------------------------------

class _CutOnce:
    """Loopback server for download.sh: the first full request for `cut` sends half the bytes
    and drops the connection; everything else (Range requests included) is served in full."""

    def __init__(self, files: dict, cut: str):
        self.files, self.cut, self.cut_done, self.ranges = files, cut, False, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0].lstrip("/")
                data, rng = outer.files.get(path), self.headers.get("Range")
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng:
                    outer.ranges.append((path, rng))
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = data[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if path == outer.cut and not rng and not outer.cut_done:
                    outer.cut_done = True
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/*?Policy=p&Signature=s&Key-Pair-Id=k"


@pytest.fixture
def cut_server():

    shard = "llama-2-7b/consolidated.00.pth"
    server = _CutOnce(make_tree(), shard)
    yield server, shard
    server.httpd.shutdown()
    server.httpd.server_close()


def _download(url: str, target: Path, retries: int, downloader: str = "curl") -> subprocess.CompletedProcess:
    return run_download_sh(["--url", url, "--models", "7B", "--target", str(target)], downloader=downloader,
               env={"LLAMA_RETRIES": str(retries)})


@pytest.mark.parametrize("downloader", ["curl", "wget"])
def test_interrupted_download_is_kept_as_part_and_resumed_later(cut_server, tmp_path, downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f"{downloader} is not installed")
    server, shard = cut_server
    first = _download(server.url, tmp_path, retries=0, downloader=downloader)
    assert first.returncode == 3, first.stderr
    assert shard in first.stderr and "HTTP 200" not in first.stderr
    assert not (tmp_path / shard).exists(), "a partial file must never get the final name"
    part = tmp_path / (shard + ".part")
    half = len(server.files[shard]) // 2
    assert part.read_bytes() == server.files[shard][:half]

    second = _download(server.url, tmp_path, retries=0, downloader=downloader)
    assert second.returncode == 0, second.stderr
    assert (shard, f"bytes={half}-") in server.ranges
    assert (tmp_path / shard).read_bytes() == server.files[shard] and not part.exists()
    assert f"{shard}: OK" in second.stdout


def test_interrupted_download_resumes_within_the_same_run(cut_server, tmp_path):
    server, shard = cut_server
    res = _download(server.url, tmp_path, retries=1)
    assert res.returncode == 0, res.stderr
    assert "retry 1/1" in res.stdout and "resuming" in res.stdout
    assert (tmp_path / shard).read_bytes() == server.files[shard]


def test_expired_url_keeps_verified_files_and_partial_downloads(tmp_path):
    tree = make_tree()
    server = FakeS3(tree)
    try:
        assert run_download_sh(["--url", server.url(), "--models", "7B", "--target", str(tmp_path)]).returncode == 0
        verified = {p: (tmp_path / p).stat().st_mtime_ns for p in tree
                    if (tmp_path / p).is_file()}
        part = tmp_path / "llama-2-13b/consolidated.00.pth.part"
        part.parent.mkdir()
        part.write_bytes(tree["llama-2-13b/consolidated.00.pth"][:1000])
        res = run_download_sh(["--url", server.url(BAD_SIGNATURE), "--models", "7B,13B", "--target", str(tmp_path)])
    finally:
        server.close()
    assert res.returncode == 3
    assert "presigned URL has expired or is invalid; request a new one" in res.stderr
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in verified} == verified
    assert part.read_bytes() == tree["llama-2-13b/consolidated.00.pth"][:1000]


# ---- conversion: a crash midway leaves nothing half-written ---------------------------------

@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("dst_exists", [False, True])
def test_conversion_crash_midway_leaves_no_half_checkpoint(crash, dst_exists, tmp_path, monkeypatch):
    import llama.checkpoint.convert
    import llama.convert

    src = tmp_path / "hf_model"
    src.mkdir()
    dst = tmp_path / "out"
    if dst_exists:  # an earlier output of llama.convert, which --force may replace
        write_tiny_checkpoint(dst, seed=5)
        names = sorted(p.name for p in dst.iterdir())
        (dst / llama.convert.MARKER).write_text(json.dumps({"files": names}))
    before = {p.name: p.read_bytes() for p in dst.iterdir()} if dst_exists else None
    # The source reads fine; the crash comes while the second of two shards is written.
    monkeypatch.setattr(llama.checkpoint.convert, "convert_hf",
                        lambda source, work: (random_meta_weights(TINY_PARAMS), dict(TINY_PARAMS)))
    real_save, saved = torch.save, []

    def save_then_crash(obj, path, *args, **kwargs):
        if saved:
            raise crash
        real_save(obj, path, *args, **kwargs)
        saved.append(path)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(type(crash)):
        llama.convert.convert(str(src), str(dst), model_parallel_size=2, dtype="fp32", force=True)

    assert len(saved) == 1  # really crashed midway
    if dst_exists:
        assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    else:
        assert not dst.exists()
    # Only the lock file is left beside it: no half-written or moved-away checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.lock", "hf_model"] + (["out"] if dst_exists else []))
