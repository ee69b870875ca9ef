"""Load test of the OpenAI-compatible server: N chat requests, C at a time, streamed.

    python benchmarks/serve_load.py [--requests 200 --concurrency 16 --max_tokens 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --model NAME   # any OpenAI-compatible server
    python benchmarks/serve_load.py --server_root /tmp/old   # the server of another checkout (git worktree)

Without --url it starts `python -m llama.serve` on the demo model (SmolLM2-135M-Instruct) in the
default dtype with --max_batch_size equal to the concurrency, and afterwards runs the same
prompts offline through Llama.generate in this process (the engine without HTTP, the peer
that shows what the server layer costs). Reports requests/s, time to first token and whole-request
latency p50/p99, generated tokens/s, and the latency of small requests sent one after another
over one reused keep-alive connection (what Nagle's algorithm delays when the server does not
set TCP_NODELAY); prints a table and writes benchmarks/results/serve_load.json.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse", "the moon", "bread", "rivers", "a chess opening", "volcanoes", "bees", "trains",
          "the color blue", "a library", "winter", "clocks", "the ocean", "paper", "mountains", "music"]


def dialogs(count: int) -> List[list]:
    """Chat prompts of varied lengths, the same in every run."""
    return [[{"role": "user", "content": f"Tell me {'briefly ' * (i % 4)}about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(count)]


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(args) -> "tuple[subprocess.Popen, str]":
    flags = ["--max_batch_size", str(args.concurrency), "--max_seq_len", "1024", "--model_name", "demo"]
    return launch_server(flags + (["--dtype", args.dtype] if args.dtype else []), args.server_root)


def launch_server(flags: List[str], root=ROOT) -> "tuple[subprocess.Popen, str]":
    """`python -m llama.serve` with `flags` on a free port, run from checkout `root`, in its own
    process group; (process, base URL) once /health answers (the benchmarks share it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama.serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=str(root), stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("the server did not start within 5 minutes")


async def load(url: str, model: str, prompts: List[list], concurrency: int, max_tokens: int) -> Dict[str, float]:
    """Every prompt streamed through the server, `concurrency` at a time."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=os.environ.get("LLAMA_API_KEY", "none"),
                                max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    ttfts: List[float] = []
    latencies: List[float] = []
    generated = [0]

    async def one(i: int, dialog: list) -> None:
        async with gate:
            start = time.perf_counter()
            first: Optional[float] = None
            stream = await client.chat.completions.create(
                model=model, messages=dialog, max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=i,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    generated[0] += chunk.usage.completion_tokens
            ttfts.append(first if first is not None else time.perf_counter() - start)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, d) for i, d in enumerate(prompts)))
    wall = time.perf_counter() - start
    await client.close()
    return {"requests": len(prompts), "concurrency": concurrency, "wall_s": wall, "requests_per_s": len(prompts) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
            "latency_p50_s": statistics.median(latencies), "latency_p99_s": percentile(latencies, 0.99),
            "generated_tokens": generated[0], "tokens_per_s": generated[0] / wall}


def reused_connection(url: str, model: str, count: int = 40) -> Dict[str, float]:
    """Small requests one after another over one keep-alive connection, as the openai client
    sends them: GET /v1/models (no model work: what is left is the HTTP round trip) and a
    one-token chat answer; their latency p50/p90."""
    import httpx

    key = os.environ.get("LLAMA_API_KEY", "none")
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    out: Dict[str, float] = {"requests": count}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
        for name, send in (("models", lambda: http.get(f"{url}/v1/models")),
                           ("chat", lambda: http.post(f"{url}/v1/chat/completions", json=body))):
            times = []
            for _ in range(count + 3):
                start = time.perf_counter()
                send().raise_for_status()
                times.append(time.perf_counter() - start)
            times = times[3:]  # the first ones pay for the connection and warm-up
            out[f"{name}_p50_s"], out[f"{name}_p90_s"] = statistics.median(times), percentile(times, 0.9)
    return out


def offline(prompts: List[list], concurrency: int, max_tokens: int, dtype: Optional[str]) -> Dict[str, float]:
    """The same prompts through Llama.generate in this process (no HTTP), as the peer."""
    sys.path.insert(0, str(ROOT))
    from llama import Llama
    from llama.demo import ensure_demo

    generator = Llama.build(str(ensure_demo(quiet=True)), max_seq_len=1024, max_batch_size=concurrency, dtype=dtype)
    tokens = [generator.formatter.encode_dialog_prompt(d) for d in prompts]
    out: list = []
    # In a thread, as the server's engine runs: on a busy CPU the main thread's OpenMP team was
    # measured up to 50x slower here (see the README's serving section).
    worker = threading.Thread(target=lambda: out.extend(generator.generate(
        tokens, max_tokens, temperature=0.7, top_p=0.9, seed=0, stop_tokens=generator.formatter.stop_tokens)[0]))
    start = time.perf_counter()
    worker.start()
    worker.join()
    wall = time.perf_counter() - start
    n = sum(len(t) for t in out)
    return {"requests": len(prompts), "wall_s": wall, "requests_per_s": len(prompts) / wall,
            "generated_tokens": n, "tokens_per_s": n / wall}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--url", help="an OpenAI-compatible server already running (default: start ours)")
    parser.add_argument("--model", default="demo", help="the model name to send with --url")
    parser.add_argument("--dtype", help="for the server we start (default: the engine's default)")
    parser.add_argument("--no_offline", action="store_true", help="skip the offline Llama.generate peer")
    parser.add_argument("--server_root", default=str(ROOT),
                        help="the checkout whose llama.serve to start (default: this one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()

    prompts = dialogs(args.requests)
    proc = None
    if args.url is None:
        proc, url = start_server(args)
    else:
        url = args.url
    try:
        served = asyncio.run(load(url, args.model, prompts, args.concurrency, args.max_tokens))
        served["reused_connection"] = reused_connection(url, args.model)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "max_tokens": args.max_tokens,
               "server_root": args.server_root, "server": served}
    if args.url is None and not args.no_offline:
        results["offline_generate"] = offline(prompts, args.concurrency, args.max_tokens, args.dtype)

    print(f"\n{args.requests} chat requests, {args.concurrency} at a time, up to {args.max_tokens} tokens each; "
          f"{results['cpu']}, {results['cores']} cores\n")
    columns = ["requests/s", "TTFT p50", "TTFT p99", "latency p50", "latency p99", "tokens/s", "reused: GET",
               "reused: chat"]
    print(f"| {'':24} | " + " | ".join(f"{c:>11}" for c in columns) + " |")
    print(f"|{'-' * 26}|" + "|".join("-" * 13 for _ in columns) + "|")
    ms = lambda s: f"{s * 1000:9.1f}ms"  # noqa: E731
    print(f"| {'llama.serve (HTTP)':24} | {served['requests_per_s']:11.2f} | {ms(served['ttft_p50_s'])} | "
          f"{ms(served['ttft_p99_s'])} | {ms(served['latency_p50_s'])} | {ms(served['latency_p99_s'])} | "
          f"{served['tokens_per_s']:11.1f} | {ms(served['reused_connection']['models_p50_s'])} | "
          f"{ms(served['reused_connection']['chat_p50_s'])} |")
    if "offline_generate" in results:
        off = results["offline_generate"]
        print(f"| {'Llama.generate (no HTTP)':24} | {off['requests_per_s']:11.2f} | " + " | ".join(
            [f"{'':>11}"] * 4) + f" | {off['tokens_per_s']:11.1f} | {'':>11} | {'':>11} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
