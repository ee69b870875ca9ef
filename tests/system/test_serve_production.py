"""The server under production conditions: idle and half-sent connections, a cap on open
connections, SIGTERM with requests in flight, and flags (and the port) checked before the
model loads."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from helpers import REPO  # noqa: E402
from helpers.serving import KEY, MODEL, auth, start_server, stop_server  # noqa: E402


def read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        return data + b"<still open>"
    return data


def test_idle_half_sent_and_surplus_connections_are_closed(tiny_ckpt, sp_tokenizer):
    proc, url = start_server(tiny_ckpt, sp_tokenizer, "--idle_timeout_s", "1", "--max_connections", "3")
    try:
        host, port = url.removeprefix("http://").split(":")
        address = (host, int(port))
        idle = socket.create_connection(address)  # sends nothing
        half = socket.create_connection(address)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never ends its head
        time.sleep(0.3)
        third = socket.create_connection(address)
        surplus = socket.create_connection(address)  # the fourth: over the cap, refused at once
        refusal = read_all(surplus, 5)
        assert refusal.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refusal, refusal
        body = json.loads(refusal.split(b"\r\n\r\n", 1)[1])
        assert set(body["error"]) == {"message", "type", "param", "code"}
        # Within the deadline (1 s, and the cap is at most 1 s late) the silent ones are closed.
        for sock in (idle, half, third):
            assert read_all(sock, 5) == b""
        # The cap counts open connections: with those gone, requests are served again.
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        # A body that stops half-way gets 408 once the deadline passes.
        slow = socket.create_connection(address)
        slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\"".encode())
        assert read_all(slow, 5).startswith(b"HTTP/1.1 408")
    finally:
        rc, stderr = stop_server(proc)
    assert rc == 0 and "Too many open files" not in stderr, stderr[-3000:]


def test_at_the_open_file_limit_extra_connections_are_refused_without_a_log_flood(tiny_ckpt, sp_tokenizer):
    """With `ulimit -n 200` the server keeps at most 136 connections (64 descriptors spare): the
    rest are refused with a 503 at once, the process never runs out of descriptors (asyncio
    then logged an error per accept, 70 MB in 40 s), and requests are served again once the
    idle ones are closed."""
    proc, url = start_server(tiny_ckpt, sp_tokenizer, "--idle_timeout_s", "2", open_files=200)
    host, port = url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(160):
            held.append(socket.create_connection((host, int(port))))
        refused = [s for s in held[-20:] if read_all(s, 0.5).startswith(b"HTTP/1.1 503")]
        assert len(refused) >= 20 - 1, len(refused)  # the connections over the cap
        time.sleep(3)  # the idle ones are closed
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()
        rc, stderr = stop_server(proc)
    assert rc == 0 and len(stderr) < 4000 and "Too many open files" not in stderr, stderr[-3000:]


def test_sigterm_lets_short_requests_finish_and_ends_long_ones_in_openai_shape(tiny_ckpt, sp_tokenizer):
    proc, url = start_server(tiny_ckpt, sp_tokenizer, "--max_seq_len", "8192", "--shutdown_grace_s", "0.5")
    results = {}

    def ask(name: str, body: dict) -> None:
        with httpx.Client(timeout=60) as http:
            if body.get("stream"):
                with http.stream("POST", f"{url}/v1/completions", headers=auth(), json=body) as answer:
                    results[name] = (answer.status_code, [line for line in answer.iter_lines() if line])
            else:
                answer = http.post(f"{url}/v1/completions", headers=auth(), json=body)
                results[name] = (answer.status_code, answer.json())

    # Long enough to outlast the grace period on a fast machine (the tiny model: ~0.5 ms a token).
    long = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8000}
    # The first decode steps measure the decode backends (seconds, in a fresh cache): done here,
    # so that the short request below runs at full speed.
    assert httpx.post(f"{url}/v1/completions", headers=auth(), json={**long, "max_tokens": 8},
                      timeout=120).status_code == 200
    threads = [threading.Thread(target=ask, args=args) for args in [
        ("whole", long), ("stream", {**long, "stream": True}), ("short", {**long, "max_tokens": 3})]]
    deadline = time.monotonic() + 30
    for count, thread in enumerate(threads, 1):
        thread.start()
        # Each is in the server before the next (and the signal) goes.
        while httpx.get(f"{url}/health").json()["outstanding"] < count and "short" not in results:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    rc, stderr = stop_server(proc)
    for thread in threads:
        thread.join(30)
    assert rc == 0, stderr[-3000:]
    status, whole = results["whole"]
    assert status == 503 and whole["error"]["code"] == "server_shutting_down", whole
    status, lines = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    status, short = results["short"]
    assert status == 200 and short["choices"][0]["finish_reason"] == "length", short


def run_serve(*flags: str, env_extra: "dict | None" = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_API_KEY"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "llama.serve", "--ckpt_dir", "/nonexistent/checkpoint", *flags],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("flags,env,expected", [
    (("--api-key", " padded key "), {}, "--api-key has spaces around it"),
    (("--api-key", ""), {}, "--api-key is empty"),
    ((), {"LLAMA_API_KEY": ""}, "LLAMA_API_KEY is empty"),
    ((), {"LLAMA_API_KEY": "key "}, "LLAMA_API_KEY has spaces around it"),
    (("--max_queue", "-1"), {}, "--max_queue=-1"),
    (("--idle_timeout_s", "0"), {}, "--idle_timeout_s=0"),
    (("--max_connections", "0"), {}, "--max_connections=0"),
])
def test_bad_flags_are_refused_before_the_model_loads(flags, env, expected):
    """The checkpoint does not exist: the flag's error comes first, as one line."""
    done = run_serve(*flags, env_extra=env)
    assert done.returncode != 0 and expected in done.stderr, done.stderr
    assert "nonexistent" not in done.stderr and "Traceback" not in done.stderr
    assert " padded key " not in done.stderr  # a key is never printed


def test_a_port_in_use_is_refused_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        done = run_serve("--port", str(busy.getsockname()[1]))
    assert done.returncode != 0 and "cannot listen on" in done.stderr and "nonexistent" not in done.stderr
