"""Meta-layout checkpoints: finding shards, reading params.json, and loading this rank's
slice of every weight from any number of shards (memory-mapped, weights only).

A checkpoint saved for model-parallel size N is split along each weight's parallel
axis; this module rebuilds each full weight from the N pieces and cuts the piece for
rank r of M, so N and M need not match.
"""

import itertools
import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from . import pages
from .errors import LlamaError
from .model import ModelArgs
from .progress import progress

SHARD_PATTERN = "consolidated.*.pth"

# Axis along which Meta splits each weight across model-parallel ranks (None: replicated).
_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
_ROW_PARALLEL = ("wo", "w2")
# Keys Meta's checkpoints carry that the model does not use.
_IGNORED_KEYS = ("rope.freqs",)


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


def load_params(ckpt_dir: str) -> dict:
    """params.json as a dict, with required keys and value types checked."""
    path = Path(ckpt_dir) / "params.json"
    if path.exists() and not path.is_file():
        raise LlamaError(f"{str(path)!r} is not a regular file (a directory, FIFO or device); "
                         f"replace it with the model's params.json")
    if not path.is_file():
        raise LlamaError(f"{str(path)!r} is missing; a Meta checkpoint directory holds params.json "
                         f"beside its consolidated.NN.pth shards")
    try:
        params = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise LlamaError(f"{str(path)!r} is not valid JSON ({exc}); restore it from the download") from None
    if not isinstance(params, dict):
        raise LlamaError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    check_params(params, str(path))
    return params


# params.json keys the model reads, by kind; null means "not set" for every one of them.
_INT_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "rope_original_context")
_FLOAT_KEYS = ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor",
               "rope_low_freq_factor", "rope_high_freq_factor")


def check_params(params: dict, where: str) -> None:
    """LlamaError naming `where` unless params has the required keys, values of the right
    kind, and heads that split dim into even-sized (rotary) heads."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if params.get(k) is None]
    if missing:
        raise LlamaError(f"{where!r} lacks required keys {missing}; restore it from the download")
    for key, value in params.items():
        if value is None:
            continue
        if key in _INT_KEYS:  # vocab_size -1: take it from the tokenizer
            ok = type(value) is int and (value >= 1 or (key, value) == ("vocab_size", -1))
            kind = "a positive integer"
        elif key in _FLOAT_KEYS:
            ok, kind = type(value) in (int, float) and 0 < value < math.inf, "a positive number"
        elif key == "use_scaled_rope":
            ok, kind = type(value) is bool, "true or false"
        else:
            continue  # keys the model does not use (chat_format: see llama.chat_format)
        if not ok:
            raise LlamaError(f"{where!r}: {key}={value!r} is invalid, it must be {kind}; "
                             f"fix it or restore the file from the download")
    dim, heads = params["dim"], params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    if dim % heads or (dim // heads) % 2 or heads % kv_heads:
        raise LlamaError(f"{where!r}: dim={dim}, n_heads={heads}, n_kv_heads={kv_heads} do not fit "
                         f"together (dim must be n_heads times an even head size, and n_kv_heads "
                         f"must divide n_heads); fix it or restore the file from the download")


_LAYER_WEIGHTS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                  "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")
_MODEL_WEIGHTS = ("tok_embeddings", "norm", "output")


def weight_names(a: ModelArgs) -> Iterator[str]:
    """Every weight of a model of shape `a`, by Meta's names, in checkpoint order (lazily:
    params.json may claim absurd sizes)."""
    yield "tok_embeddings.weight"
    for i in range(a.n_layers):
        yield from (f"layers.{i}.{leaf}.weight" for leaf in _LAYER_WEIGHTS)
    yield from ("norm.weight", "output.weight")


def weight_shape(name: str, a: ModelArgs) -> Optional[Tuple[int, ...]]:
    """The full (unsharded) shape of weight `name` in a model of shape `a`; None if it has
    no such weight."""
    match = re.fullmatch(r"(?:layers\.(0|[1-9]\d*)\.)?([\w.]+)\.weight", name)
    if match is None:
        return None
    layer, leaf = match.groups()
    if (leaf in _MODEL_WEIGHTS) != (layer is None) or (layer is not None and int(layer) >= a.n_layers):
        return None
    kv, hidden = a.kv_heads * a.head_dim, a.ffn_hidden_dim
    return {"tok_embeddings": (a.vocab_size, a.dim), "norm": (a.dim,), "output": (a.vocab_size, a.dim),
            "attention.wq": (a.dim, a.dim), "attention.wk": (kv, a.dim), "attention.wv": (kv, a.dim),
            "attention.wo": (a.dim, a.dim), "feed_forward.w1": (hidden, a.dim),
            "feed_forward.w2": (a.dim, hidden), "feed_forward.w3": (hidden, a.dim),
            "attention_norm": (a.dim,), "ffn_norm": (a.dim,)}.get(leaf)


def _layer_indices(names: Iterable[str]) -> set:
    return {int(m.group(1)) for name in names if (m := re.match(r"layers\.(\d+)\.", name))}


def check_weights_fit(weights: Dict[str, torch.Tensor], params: dict, where: str) -> None:
    """LlamaError naming `where` unless `weights` (full, unsharded, Meta's names) are exactly
    the weights of a model with these params, in the right shapes."""
    layers = _layer_indices(weights)
    if len(layers) != params["n_layers"] or layers != set(range(len(layers))):
        raise LlamaError(f"{where!r} holds weights for {len(layers)} layers but says n_layers="
                         f"{params['n_layers']}; the file is damaged or not a plain Llama model")
    a = ModelArgs.from_params(params)
    wrong = [f"{name} {tuple(weights[name].shape) if name in weights else 'missing'} (expected {shape})"
             for name in weight_names(a)
             if name not in weights or tuple(weights[name].shape) != (shape := weight_shape(name, a))]
    wrong += [f"{name} (unexpected)" for name in weights if weight_shape(name, a) is None]
    if wrong:
        raise LlamaError(f"the weights in {where!r} do not fit its own settings: {', '.join(wrong[:4])}; "
                         f"the file is damaged or not a plain Llama model")


def check_shards(paths: List[Path], states: Dict[int, Dict[str, torch.Tensor]], a: ModelArgs) -> None:
    """LlamaError naming the file unless each opened shard (`states`, by index into `paths`)
    holds exactly the weights of a model of shape `a`, dense floating-point, each in the shape
    of its 1/N share. Reads nothing but the shards' pickled metadata, so it runs before
    anything is allocated, whatever params.json claims."""
    where, n_shards = str(paths[0].parent), len(paths)
    for i, state in states.items():
        names = set(state) - set(_IGNORED_KEYS)
        missing = list(itertools.islice((k for k in weight_names(a) if k not in names), 5))
        unexpected = sorted(k for k in names if weight_shape(k, a) is None)
        if missing or unexpected:
            raise LlamaError(f"checkpoint {where!r} does not fit params.json: missing weights {missing}, "
                             f"unexpected weights {unexpected[:5]} ({paths[i].name} holds "
                             f"{len(_layer_indices(names))} layers, params.json says n_layers={a.n_layers})")
        for name in weight_names(a):
            tensor = state[name]
            if tensor.layout != torch.strided or tensor.is_quantized or not tensor.is_floating_point():
                kind = tensor.layout if tensor.layout != torch.strided else tensor.dtype
                raise LlamaError(f"weight {name!r} in {str(paths[i])!r} is a {kind} tensor; checkpoint "
                                 f"weights must be dense floating-point (bf16, fp16 or fp32): the file is "
                                 f"damaged or was saved by a quantization tool; use the original weights")
            full = weight_shape(name, a)
            vocab_split = name == "tok_embeddings.weight" and tensor.dim() == 2 and tensor.shape[1] == a.dim
            axis = parallel_axis(name, vocab_split)
            shard = tuple(n // n_shards if d == axis else n for d, n in enumerate(full))
            if tuple(tensor.shape) != shard or (axis is not None and full[axis] % n_shards):
                expect = f"{shard} in each of {n_shards} shards" if n_shards > 1 else f"{shard}"
                raise LlamaError(f"weight {name!r} in {where!r} has shape {tuple(tensor.shape)} in "
                                 f"{paths[i].name}, which does not fit params.json (expected {expect})")


def parallel_axis(name: str, vocab_parallel_embedding: bool = False) -> Optional[int]:
    """The axis along which Meta's checkpoints (and our model) split `name` across ranks;
    None: replicated. tok_embeddings: the vocabulary (0) in Llama 3's layout, else the
    embedding dim (1)."""
    if name == "tok_embeddings.weight":
        return 0 if vocab_parallel_embedding else 1
    if name == "output.weight":
        return 0
    leaf = name.split(".")[-2] if name.endswith(".weight") else name
    if leaf in _COLUMN_PARALLEL:
        return 0
    if leaf in _ROW_PARALLEL:
        return 1
    return None


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


def split_state_dict(full: Dict[str, torch.Tensor], n_shards: int,
                     vocab_split_embedding: bool = False) -> List[Dict[str, torch.Tensor]]:
    """Cut a full (unsharded) state dict into n_shards Meta-layout shards.

    vocab_split_embedding: split tok_embeddings on the vocabulary (Llama 3 style)
    instead of the embedding dim (Llama 1/2 style).
    """
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in full.items():
        axis = parallel_axis(name)
        if name == "tok_embeddings.weight" and vocab_split_embedding:
            axis = 0
        if axis is not None and n_shards > 1 and tensor.shape[axis] % n_shards:
            raise LlamaError(f"cannot split {name!r} of shape {tuple(tensor.shape)} into {n_shards} "
                             f"shards; choose a model-parallel size that divides it")
        if axis is None or n_shards == 1:
            pieces = [tensor] * n_shards
        else:  # clone, or torch.save would write each chunk's whole underlying storage
            pieces = [piece.clone() for piece in tensor.chunk(n_shards, dim=axis)]
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def save_checkpoint(full: Dict[str, torch.Tensor], params: dict, dst: str, n_shards: int = 1,
                    vocab_split_embedding: bool = False) -> None:
    """Write full weights as consolidated.NN.pth shards plus params.json into dst."""
    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(split_state_dict(full, n_shards, vocab_split_embedding)):
        torch.save(shard, root / f"consolidated.{i:02d}.pth")
    (root / "params.json").write_text(json.dumps(params, indent=2) + "\n")
