"""python -m llama.batch: run a JSONL file of prompts (or dialogs with --chat) through a model.

Each input line is `{"id": ..., "prompt": "..."}` (or `"dialog": [...]`), optionally with its
own `temperature`, `top_p` and `max_gen_len`, stop strings (`stop`: a string or a list of
strings; the text ends before the first, and the line's row is freed as soon as one appears)
and sampling controls (`top_k`, `min_p`, `presence_penalty`, `frequency_penalty`,
`repetition_penalty`, `logit_bias`: llama.runtime.sampling); any other field is refused, as
is a bad value, naming the line. Lines are continuously batched (llama.runtime.engine): a
line's result is appended to the output (one JSON line, flushed and fsynced) as soon as it is
finished, and its row takes the next line at once. A line samples with a key made from --seed
and its id, so its result does not depend on batching, on the number of processes or on
restarts: a job that is killed is simply started again, ids already in the output are skipped,
and the output is that of an uninterrupted run.

Under torchrun the world is data-parallel replicas of the model, each a model-parallel group of
--model_parallel_size ranks: rank 0 owns the output (a lock for the job's lifetime), reads the
work and shares it out; each replica takes every R-th pending line and its first rank appends
that replica's results (each append one write of whole lines under a lock on the file).
"""

import collections
import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from .chat_format import check_messages
from .cli import ModelFlags, path_flags, run, with_model_flags
from .detokenize import token_texts
from .errors import LlamaError
from .generation import MAX_SAMPLES, Llama, check_stops, generated_text
from .runtime.distributed import FromMainRank
from .runtime.engine import Request
from .runtime.sampling import SamplingControls, check_sampling, request_key
from .utils.checks import check_text, whole_number
from .utils.locking import lock_path, try_hold
from .utils.measurements import first_use_seconds
from .utils.progress import counter
from .utils.ranks import is_main_rank

Params = Tuple[float, float, Optional[int]]  # temperature, top_p, max_gen_len
CONTROLS = ("top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
SETTINGS = ("temperature", "top_p", "max_gen_len", "stop", "n") + CONTROLS  # what a line may set for itself


@dataclass
class InputLine:
    """One input line: the work of one result."""
    number: int  # its line number in the input
    id: Any
    prompt: Any  # a str, or a dialog (list of messages) with --chat
    params: Params
    stops: Tuple[str, ...] = ()
    controls: SamplingControls = SamplingControls()
    n: Optional[int] = None  # samples of this line (its result then holds "samples")


def id_key(value: Any) -> str:
    """Ids compare by their JSON text: 1 and "1" are different ids."""
    return json.dumps(value)


def read_jobs(path: str, chat: bool, defaults: Params) -> List[InputLine]:
    """Parse and check every input line; LlamaError names the first bad line."""
    if not os.path.isfile(path):
        raise LlamaError(f"--input {path!r} is not a file; give a JSONL file with one "
                         f'{{"id": ..., "prompt": "..."}} object per line')
    field = "dialog" if chat else "prompt"
    jobs: List[InputLine] = []
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
            unknown = [name for name in rec if name not in ("id", field) + SETTINGS]
            if unknown:
                hint = " (dialogs need --chat)" if "dialog" in unknown else \
                    " (plain prompts run without --chat)" if "prompt" in unknown else ""
                raise LlamaError(f"{where} (id {ident!r}) has the unknown field {unknown[0]!r}{hint}; a line "
                                 f"may hold only id, {field}, {', '.join(SETTINGS)}")
            prompt = rec[field]
            if chat:
                try:
                    check_messages(prompt)
                except LlamaError as exc:
                    raise LlamaError(f"{where} (id {ident!r}): {exc}") from None
            else:
                check_text(prompt, f'{where} (id {ident!r}): "prompt"')
            settings = [rec.get(name, default) for name, default in
                        zip(("temperature", "top_p", "max_gen_len"), defaults)]
            params = check_sampling(*settings, where=f"{where} (id {ident!r}): ")
            stops = check_stops(rec.get("stop"), f"{where} (id {ident!r}): ")
            controls = SamplingControls.checked(**{name: rec[name] for name in CONTROLS if name in rec},
                                                where=f"{where} (id {ident!r}): ")
            n = whole_number(rec["n"], f"{where} (id {ident!r}): n", low=1, high=MAX_SAMPLES) if "n" in rec else None
            jobs.append(InputLine(number, ident, prompt, params, stops, controls, n))
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


def job_key(seed: int, ident: Any, sample: int = 0) -> int:
    """The sampling key of the line with id `ident` (of its sample `sample`, with "n"): its result
    depends on the seed, the id, the prompt and its settings, never on which process ran it, with
    whom, or after which restart."""
    return request_key(seed, id_key(ident)) if not sample else request_key(seed, id_key(ident), sample)


def share(jobs: List[InputLine], done: Set[str], replica: int, replicas: int) -> List[InputLine]:
    """This replica's part of the jobs not yet in the output: every `replicas`-th one, in input
    order. Each pending id goes to exactly one replica, whatever their number."""
    pending = [job for job in jobs if id_key(job.id) not in done]
    return pending[replica::replicas]


def check_lengths(generator: Llama, jobs: List[InputLine], chat: bool, path: str) -> None:
    """Refuse dialogs the model's chat format cannot take, prompts that cannot fit
    max_seq_len and logit_bias ids outside the vocabulary, before any work starts. A prompt
    may fill the whole context; it then generates nothing, as in Meta's code."""
    limit = generator.model.params.max_seq_len
    for job in jobs:
        job.controls.within(generator.model.params.vocab_size, f"{path} line {job.number} (id {job.id!r}): ")
        if chat:
            try:  # the order of the roles is the model's chat format's to judge
                generator.formatter.check_dialog(job.prompt)
            except LlamaError as exc:
                raise LlamaError(f"{path} line {job.number} (id {job.id!r}): {exc}") from None
        tokens = _prompt_tokens(generator, job, chat)
        if tokens is None:
            continue
        if not tokens:
            raise LlamaError(f"{path} line {job.number} (id {job.id!r}): the prompt is empty; give some text")
        if len(tokens) > limit:
            raise LlamaError(f"{path} line {job.number} (id {job.id!r}): the prompt has {len(tokens)} tokens, "
                             f"too many for --max_seq_len={limit}; shorten it or raise --max_seq_len")


def _prompt_tokens(generator: Llama, job: InputLine, chat: bool) -> Optional[List[int]]:
    """The job's prompt as token ids; None for a dialog that is answered with the chat format's
    error text instead (it holds the format's control tags), as chat_completion answers it."""
    if chat:
        if generator.formatter.is_unsafe(job.prompt):
            return None
        return generator.formatter.encode_dialog_prompt(job.prompt)
    return generator.tokenizer.encode(job.prompt, bos=generator.tokenizer.add_bos, eos=False)


class ResultWriter:
    """Appends result lines to the output; several processes (one per replica) may append at
    once. Each append writes whole lines under an exclusive lock on the file, every byte of
    them (write() may take fewer), then fsyncs; a fragment that a writer killed mid-write left
    at the end is cut off first (its id is not in the output, so a resumed job runs it again).
    When the lines cannot all be written (a full disk, a quota, a file-size limit), what was
    written of them is cut off and the job stops with an OutputError: the file then holds only
    whole results, and the same command resumes it."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "a+b")  # read too: to find a fragment

    def append(self, lines: List[str]) -> None:
        data = "".join(lines).encode("utf-8")
        fd = self.file.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _cut_fragment(fd)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)  # whole results only
                kept = count_lines(fd)
                raise OutputError(f"cannot write to --output {self.path!r} ({exc.strerror or exc}); the {kept} "
                                  f"results in it are whole and kept; make room (or raise the limit) and run the "
                                  f"same command again: it resumes where this stopped") from None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.file.close()


class OutputError(LlamaError):
    """The results could not be written (a full disk, a quota, a file-size limit)."""


def write_all(fd: int, data: bytes) -> None:
    """Every byte of `data` at fd's offset, or an OSError: write() may write fewer than asked
    (at a file-size limit, or a nearly full disk), and then says why on the next call."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def count_lines(fd: int) -> int:
    """The number of newlines in the file (its whole results)."""
    count, offset = 0, 0
    while block := os.pread(fd, 1 << 20, offset):
        count += block.count(b"\n")
        offset += len(block)
    return count


def _cut_fragment(fd: int) -> None:
    """Truncate the file after its last newline (nothing if it ends in one)."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        block = os.pread(fd, min(65536, end), end - min(65536, end))
        if end == size and block.endswith(b"\n"):
            return
        cut = block.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, end - len(block) + cut + 1)
            return
        end -= len(block)
    os.ftruncate(fd, 0)


def run_jobs(generator: Llama, jobs: List[InputLine], chat: bool, logprobs: bool, seed: int,
             out: Optional[ResultWriter]) -> Tuple[int, float, float]:
    """Generate the jobs (every rank of a replica alike), continuously batched: a finished line is
    appended to `out` (the replica's writer passes one) at once. Returns (tokens, seconds, seconds
    of one-time work: first-use measurements, the native build), the first without the second."""
    start = time.perf_counter()

    def seconds() -> float:
        return time.perf_counter() - start - first_use_seconds(start)

    bar = counter("batch", len(jobs), "line")
    runnable, requests, stops = [], [], []  # per request: its line, the request, its stop strings
    for job in jobs:
        tokens = _prompt_tokens(generator, job, chat)
        if tokens is None:  # answered at once, as chat_completion answers it
            if out is not None:
                unsafe = (generator.formatter.UNSAFE_ERROR, [], [])
                out.append([_line(job, [unsafe] * (job.n or 1), logprobs)])
            bar.update(1)
            continue
        temperature, top_p, max_gen_len = job.params
        stop_tokens = generator.formatter.stop_tokens if chat else generator.tokenizer.stop_tokens
        for sample in range(job.n or 1):  # samples of a line are admitted together: one prefill
            runnable.append(job)
            requests.append(Request(tokens, max_gen_len or generator.model.params.max_seq_len - 1, temperature,
                                    top_p, job_key(seed, job.id, sample), stop_tokens, logprobs,
                                    controls=job.controls))
            stops.append(job.stops)
    generated = 0
    finished: Dict[int, List[Tuple[int, Any]]] = collections.defaultdict(list)  # line number -> its samples
    for index, handle in generator.complete(requests, stops):
        generated += len(handle.tokens)
        job = runnable[index]
        finished[job.number].append((index, handle))
        if len(finished[job.number]) < (job.n or 1):
            continue
        if out is not None:  # the line is whole: its samples in order
            samples = [(generated_text(generator.tokenizer, h.tokens, job.stops),
                        token_texts(generator.tokenizer, h.tokens) if logprobs else [], h.logprobs)
                       for _, h in sorted(finished.pop(job.number), key=lambda item: item[0])]
            out.append([_line(job, samples, logprobs)])
        bar.update(1)
        bar.set_postfix_str(f"{generated / max(seconds(), 1e-9):.1f} tokens/s")
    bar.close()
    return generated, seconds(), first_use_seconds(start)


def _line(job: InputLine, samples: List[Tuple[str, List[str], List[float]]], logprobs: bool) -> str:
    """One output line: id first (read_done relies on it), then the generated text (and with
    --logprobs each token's text and logprob, as text_completion/chat_completion give them).
    samples: (text, token texts, logprobs) of each sample; a line with "n" holds them all under
    "samples" and the first again as "generation"."""
    def result(text: str, tokens: List[str], logprobs_: List[float]) -> Dict[str, Any]:
        return {"generation": text, **({"tokens": tokens, "logprobs": logprobs_} if logprobs else {})}

    rec: Dict[str, Any] = {"id": job.id, **result(*samples[0])}
    if job.n is not None:
        rec["samples"] = [result(*sample) for sample in samples]
    return json.dumps(rec, ensure_ascii=False) + "\n"


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def owning_output(path: str) -> Iterator[None]:
    """Rank 0 holds the output for the job's lifetime: a second job on the same output is
    refused (a job that was killed holds nothing: the OS drops its lock). The output must be
    a regular file (or a new one) that can be appended to and read back.

    This is the job-level lock; the several writers of one job (one per data-parallel replica)
    coordinate each append among themselves (ResultWriter)."""
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


def load_work(input: str, output: str, chat: bool, defaults: Params) -> Tuple[List[InputLine], Set[str]]:
    """Rank 0: every input line (checked) and the ids already in the output. Call it while
    owning the output (owning_output)."""
    jobs = read_jobs(input, chat, defaults)
    if os.path.exists(output) and os.path.samefile(input, output):
        raise LlamaError(f"--output {output!r} is the input file; give another path")
    return jobs, read_done(output)


def run_batch(generator: Llama, input: str, output: str, chat: bool = False,
              defaults: Params = (0.6, 0.9, None), logprobs: bool = False,
              seed: int = 1, work: Optional[Tuple[List[InputLine], Set[str]]] = None) -> None:
    """Generate what the output still lacks; every rank calls this. Rank 0 owns the output for
    the job (reads the work, checks it, shares it out); with several data-parallel replicas each
    replica takes its share and its first rank appends that replica's results.
    `work` is load_work's result if rank 0 already has it."""
    main_rank = is_main_rank()
    with owning_output(output) if main_rank else contextlib.nullcontext():
        _run_batch(generator, input, output, chat, defaults, logprobs, seed, work, main_rank)


def _run_batch(generator: Llama, input: str, output: str, chat: bool, defaults: Params, logprobs: bool,
               seed: int, work: Optional[Tuple[List[InputLine], Set[str]]], main_rank: bool) -> None:
    def plan_work() -> Tuple[List[InputLine], Set[str]]:
        """Rank 0: every job of the input and the ids the output already holds (the pending
        prompts checked against max_seq_len)."""
        jobs, done = work if work is not None else load_work(input, output, chat, defaults)
        pending = [job for job in jobs if id_key(job.id) not in done]
        check_lengths(generator, pending, chat, input)
        extra = len(done - {id_key(j.id) for j in jobs})
        if extra:
            _note(f"{output}: keeping {extra} results whose ids are not in {input}")
        if not pending:
            _note(f"nothing to do: all {len(jobs)} ids of {input} are already in {output}")
        return jobs, done

    # The other ranks wait in bounded steps while rank 0 reads and tokenizes, however large the input.
    jobs, done = FromMainRank().get(plan_work, f"reading {input}")
    ctx = generator.ctx
    replica, replicas = (ctx.data_parallel_rank, ctx.data_parallel_size) if ctx is not None else (0, 1)
    mine = share(jobs, done, replica, replicas)
    writer = ResultWriter(output) if ctx is None or ctx.model_parallel_rank == 0 else None
    try:
        tokens, seconds, first_use = run_jobs(generator, mine, chat, logprobs, seed, writer) if mine else (0, 0.0, 0.0)
    finally:
        if writer is not None:
            writer.close()
    if not main_rank:
        return
    pending = {id_key(job.id) for job in jobs} - done
    if replicas > 1:  # the job's lock is held until every replica has written its share
        wait_for(output, pending)
    if pending:
        rate = f"{tokens / max(seconds, 1e-9):.1f} tokens/s"
        if first_use >= 0.5:
            rate += f", after {first_use:.0f} s of first-use work on this machine (not repeated)"
        who = f" by {replicas} replicas (replica 0: {tokens} tokens in {seconds:.1f} s, {rate})" if replicas > 1 \
            else f"; {tokens} tokens generated in {seconds:.1f} s: {rate}"
        _note(f"wrote {len(pending)} results to {output} ({len(done)} were there already){who}")


def wait_for(output: str, ids: Set[str], poll_s: float = 0.5) -> None:
    """Wait until every id in `ids` has a whole line in the output (written by any replica).
    Reads only; a replica that fails ends the whole torchrun job, this process included."""
    seen: Set[str] = set()
    offset = 0
    while not ids <= seen:
        with open(output, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for raw in data[:end].split(b"\n")[:-1]:
            key = _result_key(raw)
            if key is not None:
                seen.add(key)
        offset += end
        if not ids <= seen:
            time.sleep(poll_s)


@with_model_flags(max_seq_len=512, max_batch_size=4)
@path_flags("input", "output")
def main(
    model: ModelFlags,
    input: str,  # noqa: A002 - the flag is --input
    output: str,
    chat: bool = False,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    logprobs: bool = False,
    seed: int = 1,
):
    """Generate for every line of --input and append the results to --output (JSONL). Under
    torchrun the world holds world_size / --model_parallel_size replicas of the model, which
    share the input.

    Args:
        input: JSONL file, one {"id", "prompt"} (or {"id", "dialog"} with --chat) per line;
            optional per-line "temperature", "top_p", "max_gen_len" override the flags, and
            "stop", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias" apply to that line; "n" asks for that many samples
            (its result holds them under "samples"; the prompt is prefilled once).
        output: JSONL results, one {"id", "generation"} per line; ids already there are skipped.
        chat: lines hold dialogs, answered as the assistant.
        temperature: 0 is greedy; higher samples more freely.
        top_p: sample among the most likely tokens whose probabilities reach this sum.
        max_gen_len: the longest generation of a line, in tokens; default: the room left.
        logprobs: also write each result's "tokens" and "logprobs".
        seed: a line samples with a key made from the seed and its id, so reruns, resumed
            jobs and any number of processes draw alike.
    """
    defaults = check_sampling(temperature, top_p, max_gen_len, where="--")
    main_rank = is_main_rank()
    # Rank 0 owns the output and checks the files before the (possibly long) model load; an
    # error there ends the job, and torchrun then stops the other ranks.
    with owning_output(output) if main_rank else contextlib.nullcontext():
        work = load_work(input, output, chat, defaults) if main_rank else None
        generator = model.build(seed=seed)
        run_batch(generator, input, output, chat, defaults, logprobs, seed, work)


if __name__ == "__main__":
    run(main)
