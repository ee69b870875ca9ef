"""Loaded weights against the checkpoint they came from (Meta's split axes written out here
independently of llama.checkpoint), and a build posing as one rank of a model-parallel job."""

import contextlib
from pathlib import Path
from typing import Iterator, List

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

    import llama.model.parallel
    import llama.runtime.loading
    from llama.runtime.distributed import DistContext

    ctx = DistContext(rank=rank, world_size=size, local_rank=rank, model_parallel_size=size,
                      model_parallel_rank=rank, device=torch.device("cpu"), backend="gloo")
    saved = [(llama.runtime.loading, "init_distributed"), (llama.runtime.loading, "silence_non_main_ranks"),
             (llama.model.parallel, "model_parallel_size"), (llama.model.parallel, "model_parallel_rank")]
    saved = [(module, name, getattr(module, name)) for module, name in saved]
    llama.runtime.loading.init_distributed = lambda *args: ctx
    llama.runtime.loading.silence_non_main_ranks = lambda: None
    llama.model.parallel.model_parallel_size = lambda: size
    llama.model.parallel.model_parallel_rank = lambda: rank
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
