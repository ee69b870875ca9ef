"""Meta's checkpoint layout: the weight names of a model of a given shape, their full shapes,
the axis each is split on across model-parallel ranks, the checks that a checkpoint's tensors
are exactly those (from the shards' metadata, before anything is read), and splitting full
weights into N shards (what llama.convert and the tests write).
"""

import itertools
import json
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..errors import LlamaError
from ..model.args import ModelArgs

# Axis along which Meta splits each weight across model-parallel ranks (None: replicated).
_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
_ROW_PARALLEL = ("wo", "w2")
# Keys Meta's checkpoints carry that the model does not use.
_IGNORED_KEYS = ("rope.freqs",)



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


def model_parallel_sizes(args: ModelArgs, up_to: int = 64) -> List[int]:
    """The model-parallel sizes (up to `up_to`) this model splits over: those dividing every
    split dimension (heads, kv heads, dim, vocabulary, feed-forward hidden size)."""
    sizes = (args.n_heads, args.kv_heads, args.dim, args.vocab_size, args.ffn_hidden_dim)
    return [m for m in range(1, up_to + 1) if all(v % m == 0 for v in sizes)]


def check_divisible(args: ModelArgs, mp: int, what: str = "run") -> None:
    """LlamaError unless every split dimension divides by the model-parallel size `mp`, naming
    the sizes that work. `what`: the action refused ("run", "convert")."""
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim,
             "vocab_size": args.vocab_size, "feed-forward hidden size": args.ffn_hidden_dim}
    bad = [f"{name}={value}" for name, value in sizes.items() if value % mp]
    if bad:
        working = ", ".join(map(str, model_parallel_sizes(args)))
        raise LlamaError(f"this model cannot be split over {mp} model-parallel ranks: {', '.join(bad)} "
                         f"not divisible by {mp}; {what} it with a model-parallel size that divides them all: "
                         f"{working}")


def save_checkpoint(full: Dict[str, torch.Tensor], params: dict, dst: str, n_shards: int = 1,
                    vocab_split_embedding: bool = False) -> None:
    """Write full weights as consolidated.NN.pth shards plus params.json into dst."""
    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(split_state_dict(full, n_shards, vocab_split_embedding)):
        torch.save(shard, root / f"consolidated.{i:02d}.pth")
    (root / "params.json").write_text(json.dumps(params, indent=2) + "\n")
