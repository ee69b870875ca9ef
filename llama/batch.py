"""python -m llama.batch: run a JSONL file of prompts (or dialogs with --chat) through a model.

Each input line is `{"id": ..., "prompt": "..."}` (or `"dialog": [...]`), optionally with its
own `temperature`, `top_p` and `max_gen_len`. Lines with the same sampling settings are
generated together in chunks of max_batch_size; each finished chunk is appended to the output
as one JSON line per result (flushed and fsynced), so a job that is killed can simply be
started again: ids already in the output are skipped, and since chunks are cut from the whole
input and seeded by number, the results are those of an uninterrupted run. Also runs under
torchrun (rank 0 reads and writes the files and hands the work list to the other ranks).
"""

import contextlib
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from .chat_format import check_dialog
from .cli import path_flags
from .distributed import is_main_rank
from .errors import LlamaError
from .generation import GenerationStats, Llama, check_sampling
from .locking import lock_path, try_hold
from .progress import progress
from .text import check_text

Params = Tuple[float, float, Optional[int]]  # temperature, top_p, max_gen_len


@dataclass
class Job:
    """One input line."""
    line: int
    id: Any
    prompt: Any  # a str, or a dialog (list of messages) with --chat
    params: Params
    pending: bool = True  # False: its result is already in the output


def id_key(value: Any) -> str:
    """Ids compare by their JSON text: 1 and "1" are different ids."""
    return json.dumps(value)


def read_jobs(path: str, chat: bool, defaults: Params) -> List[Job]:
    """Parse and check every input line; LlamaError names the first bad line."""
    if not os.path.isfile(path):
        raise LlamaError(f"--input {path!r} is not a file; give a JSONL file with one "
                         f'{{"id": ..., "prompt": "..."}} object per line')
    field = "dialog" if chat else "prompt"
    jobs: List[Job] = []
    seen: Dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LlamaError(f"{where} is not valid JSON ({exc}); each line must be one object "
                                 f'like {{"id": 1, "{field}": ...}}') from None
            if rec is None:
                continue  # blank line
            if not isinstance(rec, dict) or "id" not in rec:
                raise LlamaError(f'{where} must be a JSON object with an "id", got {raw[:80]!r}')
            ident = rec["id"]
            if isinstance(ident, bool) or not isinstance(ident, (str, int)):
                raise LlamaError(f"{where}: id {ident!r} must be a string or an integer")
            if isinstance(ident, str):
                check_text(ident, f"{where}: the id")
            if id_key(ident) in seen:
                raise LlamaError(f"{where}: id {ident!r} is already used on line {seen[id_key(ident)]}; "
                                 f"ids must be unique")
            seen[id_key(ident)] = number
            if field not in rec:
                hint = " (dialogs need --chat)" if "dialog" in rec else " (plain prompts run without --chat)" \
                    if "prompt" in rec else ""
                raise LlamaError(f'{where} (id {ident!r}) has no "{field}"{hint}')
            prompt = rec[field]
            if chat:
                try:
                    check_dialog(prompt)
                except LlamaError as exc:
                    raise LlamaError(f"{where} (id {ident!r}): {exc}") from None
            else:
                check_text(prompt, f'{where} (id {ident!r}): "prompt"')
            settings = [rec.get(name, default) for name, default in
                        zip(("temperature", "top_p", "max_gen_len"), defaults)]
            params = check_sampling(*settings, where=f"{where} (id {ident!r}): ")
            jobs.append(Job(number, ident, prompt, params))
    return jobs


def read_done(path: str) -> Set[str]:
    """Ids already in the output. A truncated last line (a crash mid-write) is cut off; a file
    that is not ours is refused, never changed."""
    if not os.path.exists(path):
        return set()
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1  # end of the last complete line
    done: Set[str] = set()
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        key = _result_key(raw)
        if key is None and raw.strip():
            raise LlamaError(f"--output {path!r} line {number} is not a result of llama.batch "
                             f"({raw[:60]!r}); give another --output or move that file away")
        if key is not None:
            done.add(key)
    tail = data[end:]
    if tail:
        key = _result_key(tail)
        if key is None and not tail.startswith(b'{"id": '):
            raise LlamaError(f"--output {path!r} ends in a line that is not a result of llama.batch "
                             f"({tail[:60]!r}); give another --output or move that file away")
        with open(path, "r+b") as f:
            if key is None:  # cut the half-written line; its prompt runs again
                f.truncate(end)
                _note(f"{path}: dropped a truncated last line ({len(tail)} bytes) left by an "
                      f"interrupted run; its prompt will run again")
            else:  # a whole result that lacks only its newline
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                done.add(key)
            f.flush()
            os.fsync(f.fileno())
    return done


def _result_key(raw: bytes) -> Optional[str]:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return id_key(rec["id"]) if isinstance(rec, dict) and "id" in rec and "generation" in rec else None


def plan(jobs: List[Job], done: Set[str], batch_size: int) -> List[Tuple[int, List[Job]]]:
    """Numbered chunks of at most batch_size jobs that share sampling settings, in input order.

    Chunks are cut from the whole input, so a restart rebuilds (and seeds) the very same ones:
    batch composition and random draws, hence results, do not depend on where a job was
    stopped. Chunks already written are left out; jobs already written are marked done."""
    groups: Dict[Params, List[Job]] = {}
    for job in jobs:
        job.pending = id_key(job.id) not in done
        groups.setdefault(job.params, []).append(job)
    chunks = [group[i: i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    return [(number, chunk) for number, chunk in enumerate(chunks) if any(job.pending for job in chunk)]


def check_lengths(generator: Llama, jobs: List[Job], chat: bool, path: str) -> None:
    """Refuse prompts that cannot fit max_seq_len before any work starts."""
    limit = generator.model.params.max_seq_len
    for job in jobs:
        if chat and generator.formatter.is_unsafe(job.prompt):
            continue  # answered with the format's error text, never encoded
        tokens = generator.formatter.encode_dialog_prompt(job.prompt) if chat else \
            generator.tokenizer.encode(job.prompt, bos=generator.tokenizer.add_bos, eos=False)
        if not tokens:
            raise LlamaError(f"{path} line {job.line} (id {job.id!r}): the prompt is empty; give some text")
        if len(tokens) >= limit:
            raise LlamaError(f"{path} line {job.line} (id {job.id!r}): the prompt has {len(tokens)} tokens, "
                             f"too many for --max_seq_len={limit}; shorten it or raise --max_seq_len")


def run_chunks(generator: Llama, chunks: List[Tuple[int, List[Job]]], chat: bool, logprobs: bool,
               seed: int, out: Optional[BinaryIO]) -> Tuple[int, float]:
    """Generate every chunk (all ranks alike), each seeded from `seed` and its number; rank 0
    passes `out` and gets the pending results of each chunk appended.
    Returns (generated tokens, seconds)."""
    tokens, start = 0, time.perf_counter()
    bar = progress(chunks, desc="batch", total=len(chunks), unit="chunk")
    for number, chunk in bar:
        torch.manual_seed(seed + number)
        temperature, top_p, max_gen_len = chunk[0].params
        prompts = [job.prompt for job in chunk]
        generator.last_stats = GenerationStats()  # stays empty if nothing is decoded
        if chat:
            preds = generator.chat_completion(prompts, temperature, top_p, max_gen_len, logprobs)
        else:
            preds = generator.text_completion(prompts, temperature, top_p, max_gen_len, logprobs)
        tokens += generator.last_stats.generated_tokens
        if out is not None:
            lines = [json.dumps(_record(job, pred, chat), ensure_ascii=False) + "\n"
                     for job, pred in zip(chunk, preds) if job.pending]
            out.write("".join(lines).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tokens/s")
    return tokens, time.perf_counter() - start


def _record(job: Job, pred: dict, chat: bool) -> dict:
    """One output line: id first (read_done relies on it), then the generated text."""
    rec = {"id": job.id, "generation": pred["generation"]["content"] if chat else pred["generation"]}
    if "logprobs" in pred:
        rec.update(tokens=pred["tokens"], logprobs=pred["logprobs"])
    return rec


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def owning_output(path: str) -> Iterator[None]:
    """Rank 0 holds the output for the job's lifetime: a second job on the same output is
    refused (a job that was killed holds nothing: the OS drops its lock). The output must be
    a regular file (or a new one) that can be appended to and read back."""
    out = Path(path)
    if out.exists() and not out.is_file():
        mode = out.stat().st_mode
        kind = "a directory" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise LlamaError(f"--output {path!r} is {kind}: llama.batch appends results to a regular file "
                         f"and reads them back to resume a job; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamaError(f"cannot create the folder of --output {path!r} ({exc.strerror or exc}); "
                         f"give a path you can write to") from None
    real = Path(os.path.realpath(out))  # one lock per file, whatever link or name leads to it
    lock = try_hold(real)
    if lock is None:
        raise LlamaError(f"--output {path!r} is being written by another llama.batch job (it holds "
                         f"{str(lock_path(real))!r}); wait for that job to end, or give another --output")
    try:
        if out.exists():
            try:
                open(out, "r+b").close()
            except OSError as exc:
                raise LlamaError(f"cannot read and append to --output {path!r} ({exc.strerror or exc}); "
                                 f"give a file you can read and write") from None
        yield
    finally:
        lock.release()


def load_work(input: str, output: str, chat: bool, defaults: Params) -> Tuple[List[Job], Set[str]]:
    """Rank 0: every input line (checked) and the ids already in the output. Call it while
    owning the output (owning_output)."""
    jobs = read_jobs(input, chat, defaults)
    if os.path.exists(output) and os.path.samefile(input, output):
        raise LlamaError(f"--output {output!r} is the input file; give another path")
    return jobs, read_done(output)


def run_batch(generator: Llama, input: str, output: str, chat: bool = False,
              defaults: Params = (0.6, 0.9, None), logprobs: bool = False,
              seed: int = 1, work: Optional[Tuple[List[Job], Set[str]]] = None) -> None:
    """Generate what the output still lacks; every rank calls this, rank 0 reads and writes.
    `work` is load_work's result if rank 0 already has it."""
    main_rank = is_main_rank()
    with owning_output(output) if main_rank else contextlib.nullcontext():
        _run_batch(generator, input, output, chat, defaults, logprobs, seed, work, main_rank)


def _run_batch(generator: Llama, input: str, output: str, chat: bool, defaults: Params, logprobs: bool,
               seed: int, work: Optional[Tuple[List[Job], Set[str]]], main_rank: bool) -> None:
    chunks: List[Tuple[int, List[Job]]] = []
    if main_rank:
        jobs, done = work if work is not None else load_work(input, output, chat, defaults)
        chunks = plan(jobs, done, generator.model.params.max_batch_size)
        check_lengths(generator, [job for _, chunk in chunks for job in chunk], chat, input)
        extra = len(done - {id_key(j.id) for j in jobs})
        if extra:
            _note(f"{output}: keeping {extra} results whose ids are not in {input}")
        if not chunks:
            _note(f"nothing to do: all {len(jobs)} ids of {input} are already in {output}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [chunks]
        dist.broadcast_object_list(shared, src=0)
        chunks = shared[0]
    if not chunks:
        return
    if not main_rank:
        run_chunks(generator, chunks, chat, logprobs, seed, None)
        return
    with open(output, "ab") as out:
        tokens, seconds = run_chunks(generator, chunks, chat, logprobs, seed, out)
    written = sum(job.pending for _, chunk in chunks for job in chunk)
    _note(f"wrote {written} results to {output} ({len(done)} were there already); {tokens} tokens "
          f"generated in {seconds:.1f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s")


@path_flags("input", "output", "ckpt_dir", "tokenizer_path")
def main(
    input: str,  # noqa: A002 - the flag is --input
    output: str,
    chat: bool = False,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    logprobs: bool = False,
    seed: int = 1,
):
    """Generate for every line of --input and append the results to --output (JSONL).

    Args:
        input: JSONL file, one {"id", "prompt"} (or {"id", "dialog"} with --chat) per line;
            optional per-line "temperature", "top_p", "max_gen_len" override the flags.
        output: JSONL results, one {"id", "generation"} per line; ids already there are skipped.
        chat: lines hold dialogs, answered as the assistant.
        ckpt_dir: checkpoint directory; default: the bundled demo model.
        logprobs: also write each result's "tokens" and "logprobs".
        seed: chunk n is sampled after torch.manual_seed(seed + n), so reruns draw alike.
    """
    defaults = check_sampling(temperature, top_p, max_gen_len, where="--")
    main_rank = is_main_rank()
    # Rank 0 owns the output and checks the files before the (possibly long) model load; an
    # error there ends the job, and torchrun then stops the other ranks.
    with owning_output(output) if main_rank else contextlib.nullcontext():
        work = load_work(input, output, chat, defaults) if main_rank else None
        from .demo import ensure_demo

        generator = Llama.build(ckpt_dir=ckpt_dir if ckpt_dir is not None else str(ensure_demo()),
                                tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                                max_batch_size=max_batch_size, model_parallel_size=model_parallel_size,
                                seed=seed, dtype=dtype, quantize=quantize)
        run_batch(generator, input, output, chat, defaults, logprobs, seed, work)


if __name__ == "__main__":
    from .cli import run

    run(main)
