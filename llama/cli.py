"""Shared plumbing for the command-line scripts: the model flags every command that runs a
model takes (one definition: with_model_flags), and run(), which turns user mistakes into one
line on stderr and exit status 1, never a traceback.

    @with_model_flags(max_seq_len=2048, max_batch_size=1)   # this command's defaults
    def main(model: ModelFlags, system: Optional[str] = None, ...):
        generator = model.build()                           # the demo model without --ckpt_dir
"""

import functools
import inspect
import os
import sys
import time
import typing
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import fire
import torch
import torch.distributed as dist
from fire.decorators import SetParseFn

from .errors import LlamaError
from .runtime.distributed import leave_process_group
from .utils.ranks import is_main_rank, launch_env

if TYPE_CHECKING:  # the commands import the engine; this module's import stays light for them
    from .generation import GenerationStats, Llama


def run(main: Callable) -> None:
    """fire.Fire(main), turning LlamaError (and a lost peer process) into a one-line error;
    a reader that closes the pipe (`| head`) ends the output quietly."""
    main.__signature__ = _readable(inspect.signature(main))
    try:
        fire.Fire(main)
        leave_process_group()
    except BrokenPipeError:
        # The reader is gone: nothing more can be shown. Point stdout at nothing so that the
        # interpreter's final flush does not fail again, and end as a killed writer would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        leave_process_group()
        sys.exit(141)
    except LlamaError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        _fail(f"out of memory ({type(exc).__name__}: {exc}); lower --max_batch_size or --max_seq_len, "
              f"or run more model-parallel processes")
    except Exception as exc:
        if not _lost_peer(exc):
            leave_process_group()  # a bug: its traceback follows, without an abort at exit
            raise
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        _fail(f"lost contact with the other processes of this job ({first_line}); one of them "
              f"failed, was killed or is stuck (waits are bounded by LLAMA_DIST_TIMEOUT): its own "
              f"error, or torchrun's summary, names the cause")


def _readable(signature: inspect.Signature) -> inspect.Signature:
    """`signature` as --help shows it: Optional[X] is shown as X (fire prints "Optional[Optional]")."""
    def shown(annotation: Any) -> Any:
        if typing.get_origin(annotation) is typing.Union:
            kept = [a for a in typing.get_args(annotation) if a is not type(None)]
            return kept[0] if len(kept) == 1 else annotation
        if isinstance(annotation, str) and annotation.startswith("Optional[") and annotation.endswith("]"):
            return annotation[len("Optional["):-1]
        return annotation

    return signature.replace(parameters=[p.replace(annotation=shown(p.annotation))
                                         for p in signature.parameters.values()])


def path_flags(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: fire passes these flags to the function as the text typed, never parsed
    (unmarked, fire turns `--ckpt_dir 2024` into the int 2024 and `--output 1e3` into 1000.0)."""
    return SetParseFn(str, *names)


# ---- the model flags ---------------------------------------------------------------------------

@dataclass
class ModelFlags:
    """Which model a command runs and how it is built: Llama.build's arguments as flags."""
    ckpt_dir: Optional[str] = None
    tokenizer_path: Optional[str] = None
    max_seq_len: int = 512
    max_batch_size: int = 4
    model_parallel_size: Optional[int] = None
    dtype: Optional[str] = None
    quantize: Optional[str] = None
    prefix_cache: bool = True
    prompt_lookup_num_tokens: int = 0
    draft_ckpt_dir: Optional[str] = None
    num_assistant_tokens: int = 5
    gpu_memory_fraction: Optional[float] = None

    def build(self, **more: Any) -> "Llama":
        """Llama.build with these flags (and `more` of its arguments, e.g. seed); the bundled
        demo model, fetched and converted on first use, when ckpt_dir is not given."""
        from .checkpoint.demo import ensure_demo
        from .generation import Llama

        ckpt_dir = self.ckpt_dir if self.ckpt_dir is not None else str(ensure_demo())
        return Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=self.tokenizer_path, max_seq_len=self.max_seq_len,
                           max_batch_size=self.max_batch_size, model_parallel_size=self.model_parallel_size,
                           dtype=self.dtype, quantize=self.quantize, prefix_cache=self.prefix_cache,
                           prompt_lookup_num_tokens=self.prompt_lookup_num_tokens,
                           draft_ckpt_dir=self.draft_ckpt_dir, num_assistant_tokens=self.num_assistant_tokens,
                           gpu_memory_fraction=self.gpu_memory_fraction, **more)

    def temperature(self, given: Optional[float], meta_default: float = 0.6) -> float:
        """The sampling temperature of an example script: `given`, else greedy (0) for the demo
        model, else Meta's default. The 135M demo answers reliably only greedily: asked for the
        capital of France, 8 of 12 seeds named Paris at 0.6 and at 0.2, 12 of 12 at 0 (bf16,
        2026-12-07)."""
        if given is not None:
            return given
        return 0.0 if self.ckpt_dir is None else meta_default


MODEL_FLAG_DOCS = {
    "ckpt_dir": "checkpoint directory (consolidated.NN.pth shards and params.json); default: the bundled "
                "demo model",
    "tokenizer_path": "the model's tokenizer file; default: the one in ckpt_dir",
    "max_seq_len": "the longest prompt + generation, in tokens",
    "max_batch_size": "the most sequences decoded at once (rows of the KV cache)",
    "model_parallel_size": "processes the model is split over; default: all of torchrun's processes",
    "dtype": "fp32, bf16 or fp16; default: the device's (or LLAMA_DTYPE)",
    "quantize": "weight-only quantization: int8, q8_0, q4_0 or q4_1; default: none",
    "prefix_cache": "reuse the keys and values of a prompt's beginning already in the cache (an earlier turn, "
                    "a shared system prompt); --noprefix_cache turns it off",
    "prompt_lookup_num_tokens": "answers draft up to this many tokens per step from their prompt and "
                                "text so far (prompt-lookup speculative decoding); 0: off",
    "draft_ckpt_dir": "a smaller model with the same tokenizer that drafts the tokens instead (speculative "
                      "decoding); default: none",
    "num_assistant_tokens": "tokens the draft model drafts per step",
    "gpu_memory_fraction": "size the KV cache to this fraction of the device's memory (beside the weights and "
                           "a forward pass): as many rows as fit, up to --max_batch_size; default: off",
}
MODEL_FLAGS = tuple(f.name for f in fields(ModelFlags))


def with_model_flags(**defaults: Any) -> Callable[[Callable], Callable]:
    """Decorator for a command `main(model: ModelFlags, ...its own flags)`: the function fire
    runs takes the command's own flags and the model flags (with `defaults` for this command),
    and its docstring documents both; `model` arrives as the ModelFlags given."""
    unknown = set(defaults) - set(MODEL_FLAGS)
    assert not unknown, f"not model flags: {unknown}"
    flags = ModelFlags(**defaults)

    def decorate(command: Callable) -> Callable:
        own = [p for name, p in inspect.signature(command).parameters.items() if name != "model"]
        model_params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          default=getattr(flags, f.name), annotation=f.type)
                        for f in fields(ModelFlags)]
        required = [p for p in own if p.default is inspect.Parameter.empty]
        optional = [p for p in own if p.default is not inspect.Parameter.empty]

        @functools.wraps(command)
        def main(*args: Any, **kwargs: Any) -> Any:
            bound = main.__signature__.bind(*args, **kwargs)
            given = {**flags.__dict__, **{k: v for k, v in bound.arguments.items() if k in MODEL_FLAGS}}
            rest = {k: v for k, v in bound.arguments.items() if k not in MODEL_FLAGS}
            return command(ModelFlags(**given), **rest)

        main.__signature__ = inspect.Signature(required + model_params + optional)
        main.__doc__ = _with_flag_docs(inspect.getdoc(command) or "", MODEL_FLAG_DOCS)
        return path_flags("ckpt_dir", "tokenizer_path", "draft_ckpt_dir")(main)

    return decorate


def _with_flag_docs(doc: str, flag_docs: dict) -> str:
    """`doc` with `flag_docs` added to its Google-style "Args:" section (made if absent)."""
    head, marker, args = doc.partition("Args:")
    lines = [f"    {name}: {text}" for name, text in flag_docs.items()]
    return f"{head.rstrip()}\n\nArgs:\n" + (args.strip("\n") + "\n" if marker else "") + "\n".join(lines)


PEER_ERROR_DELAY_S = 3.0  # how long another rank waits for rank 0 to report an error first


def _fail(message: str) -> None:
    """One line on stderr, exit 1. Under torchrun most errors (a bad flag, a model that does not
    split) meet every rank alike: rank 0 says it at once; another rank says it only if it is
    still running a moment later (torchrun stops the others as soon as one fails, so an error
    of rank 0's own is said once, and one of this rank alone is still said, naming the rank)."""
    text = " ".join(message.splitlines())
    rank = _launch_rank()
    if rank:
        leave_process_group()
        time.sleep(PEER_ERROR_DELAY_S)
        text = f"(rank {rank}) {text}"
    print(f"error: {text}", file=sys.stderr, flush=True)
    leave_process_group()
    sys.exit(1)


def _launch_rank() -> int:
    """This process's rank as torchrun started it (0 for a world of one, or when unsure)."""
    try:
        return launch_env()[0]
    except LlamaError:
        return 0


def _lost_peer(exc: Exception) -> bool:
    """A collective failed because another rank went away or timed out (gloo says so in a
    plain RuntimeError, NCCL in a DistBackendError)."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


def print_streamed(pieces: Iterable[str]) -> None:
    """Print text pieces as they arrive, then the separator Meta's examples print."""
    for piece in pieces:
        print(piece, end="", flush=True)
    print("\n\n==================================\n")


def print_timing(stats: "GenerationStats") -> None:
    """The timing line after a generation, on stderr, from rank 0 only."""
    if is_main_rank():
        print(stats.summary(), file=sys.stderr, flush=True)
