"""download.sh against a loopback fake of Meta's presigned-URL server."""

import hashlib
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from . import REPO

SCRIPT = REPO / "download.sh"
SIGNATURE = "GoodSig~abc123XYZ"
BAD_SIGNATURE = "ExpiredSig~zzz999"
POLICY = "eyJTdGF0ZW1lbnQiOlt7IlJlc291cmNlIjoiKiJ9XX0"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _checklist(entries: dict[str, bytes]) -> bytes:
    return "".join(f"{_md5(data)}  {name}\n" for name, data in entries.items()).encode()


def make_tree() -> dict[str, bytes]:
    """Fake release tree: path -> the true bytes (checklists computed from these)."""
    rnd = lambda n, seed: hashlib.shake_256(seed.encode()).digest(n)  # noqa: E731 - deterministic bytes
    tree: dict[str, bytes] = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
        "tokenizer.model": rnd(4096, "tok"),
    }
    tree["tokenizer_checklist.chk"] = _checklist({"tokenizer.model": tree["tokenizer.model"]})
    for model, shards in (("llama-2-7b", 1), ("llama-2-13b", 2)):
        files = {f"consolidated.{i:02d}.pth": rnd(96 * 1024 + 7 * i, f"{model}/{i}") for i in range(shards)}
        files["params.json"] = b'{"dim": 64, "n_layers": 2, "n_heads": 4}\n'
        tree.update({f"{model}/{name}": data for name, data in files.items()})
        tree[f"{model}/checklist.chk"] = _checklist(files)
    return tree


class FakeS3:
    """Loopback HTTP server; `files` is what gets served (tests may corrupt it)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                parts = urlsplit(self.path)
                path = unquote(parts.path).lstrip("/")
                rng = self.headers.get("Range")
                with outer.lock:
                    outer.requests.append((path, rng))
                if parse_qs(parts.query).get("Signature") != [SIGNATURE]:
                    return self._send(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
                data = outer.files.get(path)
                if data is None:
                    return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                if rng and rng.startswith("bytes="):
                    start_s, _, end_s = rng[len("bytes="):].partition("-")
                    start = int(start_s)
                    if start >= len(data):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
                    return self._send(
                        206, data[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
                    )
                return self._send(200, data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, signature: str = SIGNATURE) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/*?Policy={POLICY}&Signature={signature}&Key-Pair-Id=APKATEST"

    def paths_requested(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_download_sh(args=(), *, downloader="curl", env=None, stdin=subprocess.DEVNULL, input=None, timeout=20, cwd=None):
    """Run download.sh with `args` (curl or wget, no retries, short timeouts)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER")}
    full_env.update(LLAMA_DOWNLOADER=downloader, LLAMA_RETRIES="0", LLAMA_RETRY_DELAY="0", LLAMA_READ_TIMEOUT="2")
    full_env.update(env or {})
    if input is not None:
        stdin = None
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, stdin=stdin, input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
