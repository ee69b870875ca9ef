"""Meta-layout checkpoint shards: finding them, opening them (memory-mapped, plain tensors
only, nothing read but their pickled index), and loading this rank's slice of every weight
from any number of shards.

A checkpoint saved for model-parallel size N is split along each weight's parallel
axis; this module rebuilds each full weight from the N pieces and cuts the piece for
rank r of M, so N and M need not match.
"""

import pickle
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import LlamaError
from ..utils.progress import progress
from . import pages
from .layout import parallel_axis

SHARD_PATTERN = "consolidated.*.pth"


def find_shards(ckpt_dir: str) -> List[Path]:
    """The consolidated.NN.pth files of ckpt_dir, in rank order."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise LlamaError(f"checkpoint directory not found: {ckpt_dir!r}; pass --ckpt_dir "
                         f"pointing at a folder with consolidated.NN.pth and params.json")
    shards = sorted(root.glob(SHARD_PATTERN), key=lambda p: _shard_number(p))
    if not shards:
        raise LlamaError(f"no checkpoint shards ({SHARD_PATTERN}) in {ckpt_dir!r}; download the "
                         f"model there or convert one with `python -m llama.convert`")
    for path in shards:  # a FIFO or device would block or never end when read
        if not path.is_file():
            raise LlamaError(f"{str(path)!r} is not a regular file (a directory, FIFO or device); "
                             f"a checkpoint shard must be a plain file: replace it with the real shard")
    numbers = [_shard_number(p) for p in shards]
    if numbers != list(range(len(shards))):
        raise LlamaError(f"shards in {ckpt_dir!r} are numbered {numbers}; expected "
                         f"consolidated.00.pth up to consolidated.{len(shards) - 1:02d}.pth with none missing")
    return shards


def _shard_number(path: Path) -> int:
    match = re.fullmatch(r"consolidated\.(\d+)\.pth", path.name)
    return int(match.group(1)) if match else -1


def shards_for_rank(n_shards: int, mp_rank: int, mp_size: int) -> range:
    """The shards that hold part of model-parallel rank mp_rank's slice. Every split weight
    is cut evenly both ways: shard i holds the part [i/N, (i+1)/N) of its axis, the rank
    [r/M, (r+1)/M). When N == M that is shard r alone."""
    return range(mp_rank * n_shards // mp_size, -(-(mp_rank + 1) * n_shards // mp_size))


class MappedShard(Dict[str, torch.Tensor]):
    """A shard's tensors as open_shard returns them: memory-mapped from the file, read only."""


def open_shards(paths: List[Path], indices: Iterable[int]) -> Dict[int, Dict[str, torch.Tensor]]:
    """Memory-map the shards `indices` of `paths` (nothing is read but their pickled index)."""
    return {i: open_shard(paths[i]) for i in indices}


def vocab_parallel_embedding(states: Dict[int, Dict[str, torch.Tensor]], n_shards: int, dim: int) -> bool:
    """Whether the model should split tok_embeddings on the vocabulary: unless the shards
    split it on the embedding dim (Llama 1/2), so that each rank reads only its own shards.
    A single shard is cut on the vocabulary too: each rank then reads a contiguous part, and a
    tied output weight has the same slice on every rank, so the two stay one tensor."""
    embedding = next(iter(states.values())).get("tok_embeddings.weight")
    return n_shards == 1 or embedding is None or embedding.dim() != 2 or embedding.shape[1] == dim


def open_shard(path: Path) -> MappedShard:
    """Memory-map one shard; refuses anything but plain tensors (no code can run)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LlamaError(f"refusing to load {str(path)!r}: it contains objects other than tensors "
                         f"(possibly code) or is corrupted ({_reason(exc)}); only plain weight files "
                         f"are accepted: download it again from a trusted source") from None
    except Exception as exc:  # a damaged file makes torch raise nearly anything
        raise LlamaError(f"cannot read checkpoint shard {str(path)!r}: it is truncated or corrupted "
                         f"({type(exc).__name__}: {_reason(exc)}); download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LlamaError(f"{str(path)!r} does not hold a dict of tensors; is it a Meta checkpoint shard?")
    return MappedShard(state)


def _reason(exc: Exception) -> str:
    """The gist of torch.load's error: for a refused pickle, the paragraph saying what was
    refused (not torch's advice to retry with weights_only=False); else the first line."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(exc)) if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(boilerplate)] or [type(exc).__name__]
    line = useful[0].replace("WeightsUnpickler error:", "").strip().splitlines()[0]
    return line if len(line) <= 160 else line[:157] + "..."


def load_rank_state_dict(paths: List[Path], states: Dict[int, Dict[str, torch.Tensor]],
                         expected: Dict[str, torch.Size], mp_rank: int, mp_size: int,
                         device: torch.device, dtype: torch.dtype,
                         vocab_parallel: bool = False) -> Dict[str, torch.Tensor]:
    """This rank's slice of every weight, on `device` in `dtype`.

    paths: every shard of the checkpoint; states: the opened ones (at least
    shards_for_rank(len(paths), mp_rank, mp_size)), which passed check_shards. expected: the
    model's parameter shapes on this rank (its state_dict shapes). Each memory-mapped piece is
    narrowed to the part this rank keeps before it is copied, so no full weight is ever
    materialised.
    """
    result: Dict[str, torch.Tensor] = {}
    converted: Dict[tuple, torch.Tensor] = {}  # keeps tied weights (embedding = output) shared
    mapped = all(isinstance(state, MappedShard) for state in states.values())
    for name, shape in progress(expected.items(), "loading weights", total=len(expected)):
        axis = parallel_axis(name, vocab_parallel)
        parts = _rank_parts(name, shape, axis, paths, states, mp_rank, mp_size)
        # Tied weights stay one tensor when they are the same cut of the same checkpoint
        # storage. The key names the memory-mapped source storage, which `states` keeps alive
        # for the whole load, so no address can be reused; never key on a temporary (a freed
        # tensor hands its address to the next one).
        key = tuple((_storage_identity(source), cut) for source, cut, _, _ in parts)
        if key not in converted:
            converted[key] = _join(parts, shape, axis, device, dtype, mapped)
        result[name] = converted[key]
    return result


# (source tensor, its cut (axis, start, end) or None when whole, the part itself, its offset
# in the rank's slice)
_Part = Tuple[torch.Tensor, Optional[Tuple[int, int, int]], torch.Tensor, int]


def _rank_parts(name: str, shape: torch.Size, axis: Optional[int], paths: List[Path],
                states: Dict[int, Dict[str, torch.Tensor]], mp_rank: int, mp_size: int) -> List[_Part]:
    """The pieces of weight `name` that make up this rank's slice (of `shape`), each a view
    of a shard narrowed to the part this rank keeps."""
    if axis is None:  # replicated: every shard holds it whole
        piece = states[min(states)][name]
        return [(piece, None, piece, 0)]
    parts: List[_Part] = []
    for i in shards_for_rank(len(paths), mp_rank, mp_size):
        piece = states[i][name]
        # The overlap of shard i's range and this rank's, in the weight's full coordinates.
        size = piece.shape[axis]
        lo, hi = max(i * size, mp_rank * shape[axis]), min((i + 1) * size, (mp_rank + 1) * shape[axis])
        whole = (lo, hi) == (i * size, (i + 1) * size)
        parts.append((piece, None if whole else (axis, lo, hi), piece.narrow(axis, lo - i * size, hi - lo),
                      lo - mp_rank * shape[axis]))
    return parts


def _join(parts: List[_Part], shape: torch.Size, axis: Optional[int], device: torch.device,
          dtype: torch.dtype, mapped: bool) -> torch.Tensor:
    """The rank's slice from its parts, on `device` in `dtype`. A single part that needs no
    conversion stays a view of the memory-mapped shard (nothing is copied); otherwise each
    part is copied once, straight into place. mapped: the parts are MappedShard tensors,
    whose pages are read ahead and, once copied, let go."""
    if mapped:
        for source, _, part, _ in parts:
            pages.read_only_what_is_used(source, part)
    if len(parts) == 1:
        out = parts[0][2].to(device=device, dtype=dtype).contiguous()
    else:
        out = torch.empty(shape, device=device, dtype=dtype)
    for source, _, part, offset in parts:
        if len(parts) > 1:
            out.narrow(axis, offset, part.shape[axis]).copy_(part)
        if mapped and out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
            pages.release(source)  # copied: its pages need not stay resident
    return out


def _storage_identity(tensor: torch.Tensor) -> tuple:
    """Where `tensor` lies in its storage: equal for two views of the same bytes."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
