"""Tests for download.sh against a loopback fake of Meta's presigned-URL server.

The server serves a tiny fake model tree with real md5 checklists, answers 403
unless the query carries the right Signature (as S3 does for expired URLs), and
supports HTTP Range requests so resuming can be exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from helpers.download_server import BAD_SIGNATURE, POLICY, SIGNATURE, FakeS3, make_tree
from helpers.download_server import run_download_sh as run

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("md5sum") is None and shutil.which("md5") is None,
    reason="download.sh needs bash and md5sum/md5",
)

DOWNLOADERS = [
    pytest.param(tool, marks=pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed"))
    for tool in ("curl", "wget")
]


@pytest.fixture
def tree() -> dict[str, bytes]:
    return make_tree()


@pytest.fixture
def server(tree):
    srv = FakeS3(tree)
    yield srv
    srv.close()


def model_files(tree, prefix):
    return {p: d for p, d in tree.items() if p.startswith(prefix + "/")}


TOP_FILES = ("LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk")


def assert_downloaded(target: Path, tree, prefixes):
    expected = {p: tree[p] for p in TOP_FILES}
    for prefix in prefixes:
        expected.update(model_files(tree, prefix))
    for path, data in expected.items():
        assert (target / path).read_bytes() == data, path
    assert not list(target.rglob("*.part")), "no .part file may remain after success"


def assert_no_secret(res):
    out = res.stdout + res.stderr
    assert SIGNATURE not in out and BAD_SIGNATURE not in out and POLICY not in out


# 1. success path ---------------------------------------------------------------
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_success_7b_and_13b(server, tree, tmp_path, downloader):
    target = tmp_path / "weights"
    res = run(["--url", server.url(), "--models", "7B,13B", "--target", str(target)], downloader=downloader)
    assert res.returncode == 0, res.stderr
    assert_downloaded(target, tree, ["llama-2-7b", "llama-2-13b"])
    assert "llama-2-7b/consolidated.00.pth: OK" in res.stdout
    assert "llama-2-13b/consolidated.01.pth: OK" in res.stdout
    assert_no_secret(res)


def test_env_vars_and_flags_override_env(server, tree, tmp_path):
    # Env alone, TARGET_FOLDER unset: downloads into the current directory.
    target = tmp_path / "w"
    target.mkdir()
    res = run(env={"PRESIGNED_URL": server.url(), "MODEL_SIZE": "7B"}, cwd=target)
    assert res.returncode == 0, res.stderr
    assert_downloaded(target, tree, ["llama-2-7b"])
    # Flags win: the env URL is expired, the flag URL is good.
    target2 = tmp_path / "w2"
    res = run(
        ["--url", server.url(), "--target", str(target2)],
        env={"PRESIGNED_URL": server.url(BAD_SIGNATURE), "MODEL_SIZE": "7B", "TARGET_FOLDER": str(target)},
    )
    assert res.returncode == 0, res.stderr
    assert_downloaded(target2, tree, ["llama-2-7b"])


# 2. corrupted file on the server ------------------------------------------------------
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_corrupted_download_fails_and_names_file(server, tree, tmp_path, downloader):
    bad = "llama-2-7b/consolidated.00.pth"
    server.files[bad] = b"X" + tree[bad][1:]
    target = tmp_path / "w"
    res = run(["--url", server.url(), "--models", "7B,13B", "--target", str(target)], downloader=downloader)
    assert res.returncode == 1
    assert bad in res.stderr and "FAILED" in res.stderr
    assert "Delete them and rerun" in res.stderr
    # Other models still got downloaded and verified; the bad file is kept, not deleted.
    assert_downloaded(target, tree, ["llama-2-13b"])
    assert (target / bad).read_bytes() == server.files[bad]


def test_corrupted_local_file_is_reported_not_deleted(server, tree, tmp_path):
    target = tmp_path / "w"
    bad = target / "llama-2-7b/consolidated.00.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated garbage")
    res = run(["--url", server.url(), "--models", "7B", "--target", str(target)])
    assert res.returncode == 1
    assert "llama-2-7b/consolidated.00.pth" in res.stderr
    assert bad.read_bytes() == b"truncated garbage"
    assert "llama-2-7b/consolidated.00.pth" not in server.paths_requested()


# 3. expired / invalid URL ----------------------------------------------------------
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_expired_url_403(server, tmp_path, downloader):
    target = tmp_path / "w"
    res = run(["--url", server.url(BAD_SIGNATURE), "--models", "7B", "--target", str(target)], downloader=downloader)
    assert res.returncode == 3
    assert "the presigned URL has expired or is invalid; request a new one" in res.stderr
    assert_no_secret(res)
    assert server.paths_requested() == ["LICENSE"], "must stop at the first 403"
    assert not list(target.rglob("*.part"))


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_missing_file_404_names_file(server, tmp_path, downloader):
    del server.files["llama-2-13b/consolidated.01.pth"]
    res = run(["--url", server.url(), "--models", "13B", "--target", str(tmp_path)], downloader=downloader)
    assert res.returncode == 3
    assert "404" in res.stderr and "llama-2-13b/consolidated.01.pth" in res.stderr
    assert_no_secret(res)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_network_failure_names_url(tmp_path, downloader):
    with socket.socket() as s:  # grab a free port, then close it so connects are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/*?Policy={POLICY}&Signature={SIGNATURE}"
    res = run(["--url", url, "--models", "7B", "--target", str(tmp_path)], downloader=downloader)
    assert res.returncode == 3
    assert f"http://127.0.0.1:{port}/LICENSE?<redacted>" in res.stderr
    assert_no_secret(res)


# 4. resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_resume_partial_download(server, tree, tmp_path, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    half = len(tree[shard]) // 2
    part = tmp_path / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tree[shard][:half])
    res = run(["--url", server.url(), "--models", "7B", "--target", str(tmp_path)], downloader=downloader)
    assert res.returncode == 0, res.stderr
    assert (shard, f"bytes={half}-") in server.requests
    assert "resuming" in res.stdout
    assert_downloaded(tmp_path, tree, ["llama-2-7b"])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_complete_part_file_is_finished(server, tree, tmp_path, downloader):
    """A .part holding the whole file (killed before the rename): server answers 416."""
    shard = "llama-2-7b/consolidated.00.pth"
    part = tmp_path / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tree[shard])
    res = run(["--url", server.url(), "--models", "7B", "--target", str(tmp_path)], downloader=downloader)
    assert res.returncode == 0, res.stderr
    assert_downloaded(tmp_path, tree, ["llama-2-7b"])


# 5. already verified files are kept and not fetched again --------------------------------
def test_verified_files_not_redownloaded(server, tree, tmp_path):
    args = ["--url", server.url(), "--models", "7B", "--target", str(tmp_path)]
    assert run(args).returncode == 0
    before = {p: (tmp_path / p).stat() for p in tree if p.startswith("llama-2-7b/") or p in TOP_FILES}
    server.requests.clear()
    res = run(args)
    assert res.returncode == 0, res.stderr
    assert server.requests == []
    assert "already present" in res.stdout
    for p, st in before.items():
        now = (tmp_path / p).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size), p
    # Adding a model later fetches only the new model's files.
    server.requests.clear()
    res = run(["--url", server.url(), "--models", "7B,13B", "--target", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    assert set(server.paths_requested()) == set(model_files(tree, "llama-2-13b"))
    assert_downloaded(tmp_path, tree, ["llama-2-7b", "llama-2-13b"])


# 6. interactive prompts / no terminal -------------------------------------------------------
def test_prompts_answered_through_stdin(server, tree, tmp_path):
    res = run(["--target", str(tmp_path)], input=f"{server.url()}\n7B\n")
    assert res.returncode == 0, res.stderr
    assert_downloaded(tmp_path, tree, ["llama-2-7b"])
    assert not (tmp_path / "llama-2-13b").exists()


def test_missing_url_without_terminal_fails_fast(tmp_path):
    res = run(["--models", "7B", "--target", str(tmp_path)], timeout=10)
    assert res.returncode == 2
    assert "no presigned URL given" in res.stderr and "--url" in res.stderr


def test_missing_models_without_terminal_fails_fast(server, tmp_path):
    res = run(["--url", server.url(), "--target", str(tmp_path)], timeout=10)
    assert res.returncode == 2
    assert "no model list given" in res.stderr and "--models" in res.stderr
    assert server.requests == []


def test_open_but_silent_stdin_times_out(tmp_path):
    """A non-terminal stdin that never sends nor closes must not hang the script."""
    r, w = os.pipe()
    try:
        res = run(["--models", "7B", "--target", str(tmp_path)], stdin=r, env={"LLAMA_READ_TIMEOUT": "1"}, timeout=10)
    finally:
        os.close(r)
        os.close(w)
    assert res.returncode == 2
    assert "no presigned URL given" in res.stderr


# 7. unknown model / usage --------------------------------------------------------------
def test_unknown_model_exit_2(server, tmp_path):
    res = run(["--url", server.url(), "--models", "7B,8B", "--target", str(tmp_path)])
    assert res.returncode == 2
    assert "unknown model '8B'" in res.stderr
    assert "7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat" in res.stderr
    assert server.requests == [], "nothing may be downloaded before the model list is validated"


def test_help_and_bad_arguments():
    res = run(["--help"])
    assert res.returncode == 0
    assert "--url" in res.stdout and "--models" in res.stdout and "--target" in res.stdout
    res = run(["--bogus"])
    assert res.returncode == 2 and "unknown argument" in res.stderr
    res = run(["--url", "http://127.0.0.1/no-star?Signature=x", "--models", "7B"])
    assert res.returncode == 2 and "'*'" in res.stderr
    assert_no_secret(res)


# 8. environment values and planted links --------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("LLAMA_RETRIES", "3abc"),  # main: an endless retry loop ("value too great for base")
    ("LLAMA_RETRIES", "x"),  # main: "x: unbound variable" from deep inside
    ("LLAMA_RETRIES", "a[$(touch {marker})]"),  # bash evaluates variables inside (( )) as expressions
    ("LLAMA_RETRIES", "-1"),
    ("LLAMA_RETRIES", "99999999999999999999"),  # wraps around in bash arithmetic
    ("LLAMA_RETRY_DELAY", "5s"),
    ("LLAMA_READ_TIMEOUT", "1e9"),
])
def test_environment_numbers_are_checked_before_use(server, tmp_path, name, value):
    marker = tmp_path / "pwned"
    res = run(["--url", server.url(), "--models", "7B", "--target", str(tmp_path / "w")],
              env={name: value.format(marker=marker)}, timeout=10)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {name}='{value.format(marker=marker)}' must be a ")
    assert server.requests == [] and not marker.exists()


def test_numbers_with_leading_zeros_are_decimal(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run(["--url", f"http://127.0.0.1:{port}/*?Signature={SIGNATURE}", "--models", "7B", "--target", str(tmp_path)],
              env={"LLAMA_RETRIES": "08", "LLAMA_RETRY_DELAY": "0.0"})
    assert res.returncode == 3 and "retry 8/8" in res.stdout and "retry 9" not in res.stdout


@pytest.mark.parametrize("downloader", DOWNLOADERS)
@pytest.mark.parametrize("victim_exists", [True, False])
def test_planted_link_at_a_part_path_is_not_followed(server, tmp_path, downloader, victim_exists):
    victim = tmp_path / "victim"  # say, the user's ~/.bashrc
    if victim_exists:
        victim.write_bytes(b"precious")
    part = tmp_path / "w" / "llama-2-7b" / "consolidated.00.pth.part"
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    res = run(["--url", server.url(), "--models", "7B", "--target", str(tmp_path / "w")], downloader=downloader)
    assert res.returncode == 3
    assert "llama-2-7b/consolidated.00.pth.part is a symbolic link or not a regular file; refusing" in res.stderr
    assert (victim.read_bytes() == b"precious") if victim_exists else not victim.exists()
    assert part.is_symlink() and "llama-2-7b/consolidated.00.pth" not in server.paths_requested()
