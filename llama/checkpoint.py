"""Meta-layout checkpoints: finding shards, reading params.json, and loading this rank's
slice of every weight from any number of shards (memory-mapped, weights only).

A checkpoint saved for model-parallel size N is split along each weight's parallel
axis; this module rebuilds each full weight from the N pieces and cuts the piece for
rank r of M, so N and M need not match.
"""

import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .chat_format import CHAT_FORMATS
from .distributed import all_ranks_agree
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
        elif key == "chat_format":
            ok, kind = isinstance(value, str) and value in CHAT_FORMATS, f"one of {', '.join(CHAT_FORMATS)}"
        elif key == "default_system_prompt":
            ok, kind = isinstance(value, str), "a string"
        else:
            continue  # keys the engine does not use
        if not ok:
            raise LlamaError(f"{where!r}: {key}={value!r} is invalid, it must be {kind}; "
                             f"fix it or restore the file from the download")
    dim, heads = params["dim"], params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    if dim % heads or (dim // heads) % 2 or heads % kv_heads:
        raise LlamaError(f"{where!r}: dim={dim}, n_heads={heads}, n_kv_heads={kv_heads} do not fit "
                         f"together (dim must be n_heads times an even head size, and n_kv_heads "
                         f"must divide n_heads); fix it or restore the file from the download")


def check_weights_fit(weights: Dict[str, torch.Tensor], params: dict, where: str) -> None:
    """LlamaError naming `where` unless `weights` (full, unsharded, Meta's names) are exactly
    the weights of a model with these params, in the right shapes."""
    layers = {int(m.group(1)) for name in weights if (m := re.match(r"layers\.(\d+)\.", name))}
    if len(layers) != params["n_layers"] or layers != set(range(len(layers))):
        raise LlamaError(f"{where!r} holds weights for {len(layers)} layers but says n_layers="
                         f"{params['n_layers']}; the file is damaged or not a plain Llama model")
    a = ModelArgs.from_params(params)
    kv, vocab = a.kv_heads * a.head_dim, a.vocab_size
    shapes = {"tok_embeddings.weight": (vocab, a.dim), "norm.weight": (a.dim,), "output.weight": (vocab, a.dim)}
    for i in range(a.n_layers):
        for leaf, shape in (("attention.wq", (a.dim, a.dim)), ("attention.wk", (kv, a.dim)),
                            ("attention.wv", (kv, a.dim)), ("attention.wo", (a.dim, a.dim)),
                            ("feed_forward.w1", (a.ffn_hidden_dim, a.dim)),
                            ("feed_forward.w2", (a.dim, a.ffn_hidden_dim)),
                            ("feed_forward.w3", (a.ffn_hidden_dim, a.dim)),
                            ("attention_norm", (a.dim,)), ("ffn_norm", (a.dim,))):
            shapes[f"layers.{i}.{leaf}.weight"] = shape
    wrong = [f"{name} {tuple(weights[name].shape) if name in weights else 'missing'} (expected {shape})"
             for name, shape in shapes.items() if name not in weights or tuple(weights[name].shape) != shape]
    wrong += [f"{name} (unexpected)" for name in weights if name not in shapes]
    if wrong:
        raise LlamaError(f"the weights in {where!r} do not fit its own settings: {', '.join(wrong[:4])}; "
                         f"the file is damaged or not a plain Llama model")


def parallel_axis(name: str) -> Optional[int]:
    """The axis along which our model (and Meta's Llama 2) splits `name`; None: replicated."""
    if name in ("output.weight", "tok_embeddings.weight"):
        return 0 if name == "output.weight" else 1
    leaf = name.split(".")[-2] if name.endswith(".weight") else name
    if leaf in _COLUMN_PARALLEL:
        return 0
    if leaf in _ROW_PARALLEL:
        return 1
    return None


def checkpoint_axis(name: str, shard_shape: torch.Size, dim: int, n_shards: int) -> Optional[int]:
    """The axis along which a checkpoint with n_shards split `name`."""
    if name == "tok_embeddings.weight" and n_shards > 1:
        # Llama 1/2 split the embedding dim (ParallelEmbedding), Llama 3 the vocabulary
        # (VocabParallelEmbedding); the shard's width tells which.
        return 0 if shard_shape[1] == dim else 1
    return parallel_axis(name)


def _open_shard(path: Path) -> Dict[str, torch.Tensor]:
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
    return state


def _reason(exc: Exception) -> str:
    """The gist of torch.load's error: for a refused pickle, the paragraph saying what was
    refused (not torch's advice to retry with weights_only=False); else the first line."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(exc)) if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(boilerplate)] or [type(exc).__name__]
    line = useful[0].replace("WeightsUnpickler error:", "").strip().splitlines()[0]
    return line if len(line) <= 160 else line[:157] + "..."


def load_rank_state_dict(shards: List[Path], expected: Dict[str, torch.Size], dim: int,
                         mp_rank: int, mp_size: int, device: torch.device,
                         dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """This rank's slice of every weight, on `device` in `dtype`.

    expected: the model's own parameter shapes on this rank (its state_dict shapes);
    every key must be found and fit, with a clear error naming the shard otherwise.
    A collective when several processes run: if loading fails on any rank, it fails on
    every rank with that rank's message, so none goes on to wait for a rank that gave up.
    """
    with all_ranks_agree("loading the checkpoint"):
        return _load_rank_state_dict(shards, expected, dim, mp_rank, mp_size, device, dtype)


def _load_rank_state_dict(shards: List[Path], expected: Dict[str, torch.Size], dim: int,
                          mp_rank: int, mp_size: int, device: torch.device,
                          dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    states = [_open_shard(p) for p in shards]
    where = str(shards[0].parent)
    names = set(states[0]) - set(_IGNORED_KEYS)
    unknown = sorted(names - set(expected))
    missing = sorted(set(expected) - names)
    if unknown or missing:
        raise LlamaError(f"checkpoint {where!r} does not fit params.json: "
                         f"missing weights {missing[:5]}, unexpected weights {unknown[:5]}")

    result: Dict[str, torch.Tensor] = {}
    converted: Dict[tuple, torch.Tensor] = {}  # keeps tied weights (embedding = output) shared
    for name, shape in progress(expected.items(), "loading weights", total=len(expected)):
        pieces = []
        for path, state in zip(shards, states):
            if name not in state:
                raise LlamaError(f"shard {str(path)!r} lacks weight {name!r}; the download is incomplete")
            if state[name].dim() != len(shape):
                raise LlamaError(f"weight {name!r} in shard {str(path)!r} has shape {tuple(state[name].shape)}, "
                                 f"which does not fit params.json (expected {len(shape)} dimensions)")
            pieces.append(state[name])
        axis = checkpoint_axis(name, pieces[0].shape, dim, len(pieces))
        if axis is None or len(pieces) == 1:
            full = pieces[0]
        elif len({p.shape[:axis] + p.shape[axis + 1:] for p in pieces}) > 1:
            raise LlamaError(f"weight {name!r} has shapes {[tuple(p.shape) for p in pieces]} in the "
                             f"shards of {where!r}, which cannot be joined; are all shards from one model?")
        else:
            full = torch.cat(pieces, dim=axis)
        ours = full
        our_axis = parallel_axis(name)
        if mp_size > 1 and our_axis is not None and full.shape[our_axis] == shape[our_axis] * mp_size:
            ours = full.narrow(our_axis, mp_rank * shape[our_axis], shape[our_axis])
        if ours.shape != shape:
            raise LlamaError(f"weight {name!r} in {where!r} has shape "
                             f"{tuple(full.shape)} (merged from {len(shards)} shard(s)), which does "
                             f"not fit params.json (this rank expects {tuple(shape)})")
        # Tied weights (output = tok_embeddings in a 1-shard checkpoint) stay one tensor when
        # they are the same cut of the same checkpoint storage. The key names the mmap'd source
        # storages, which `states` keeps alive for the whole load, so no address is reused;
        # never key on a temporary (a freed torch.cat result hands its address to the next).
        key = (tuple(_storage_identity(p) for p in pieces), axis if full is not pieces[0] else None,
               (our_axis, mp_rank) if ours is not full else None)
        if key not in converted:
            converted[key] = ours.to(device=device, dtype=dtype).contiguous()
        result[name] = converted[key]
    return result


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
