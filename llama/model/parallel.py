"""Model-parallel layers: each rank holds a slice of a weight, and one collective over
fairscale's model-parallel group joins the ranks' results (the layout of Meta's checkpoints).
At model-parallel size 1 no collective runs.

Weight slices on each of M ranks:
  ColumnParallelLinear    [out/M, in]    output features split; gather_output all-gathers them
  RowParallelLinear       [out, in/M]    input features split; partial sums all-reduced
  ParallelEmbedding       [vocab, dim/M] embedding dim split (Llama 1/2 checkpoints); all-gathered
  VocabParallelEmbedding  [vocab/M, dim] vocabulary split (Llama 3 checkpoints); each rank embeds
                                         the tokens in its range, zeros elsewhere; all-reduced

Parameters are created with torch.empty, so under `with torch.device("meta")` building a
model allocates nothing; the weights then arrive from the checkpoint.
"""

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from .. import native

Collective = Callable[[torch.Tensor], torch.Tensor]
_FLOAT_LAYOUTS = {torch.float32: "f32", torch.bfloat16: "bf16"}
_SMALL_PRODUCTS_MEASURED = [False]  # see measured_small_products()


@contextlib.contextmanager
def measured_small_products() -> Iterator[None]:
    """Within the block, a float layer's product over 2 to native.MAX_NATIVE_ROWS rows on the
    CPU runs on the kernel measured fastest for its shape and row count (native.linear: the
    native kernels, oneDNN or PyTorch's plain GEMM), which reads the weight as it is. For the
    passes that verify a draft, where PyTorch's GEMM at a few rows reads the weights far below
    the memory's speed. Not the default: a product's rounding then depends on its row count,
    so a request's tokens would depend on its batch mates in fp32 too."""
    saved = _SMALL_PRODUCTS_MEASURED[0]
    _SMALL_PRODUCTS_MEASURED[0] = True
    try:
        yield
    finally:
        _SMALL_PRODUCTS_MEASURED[0] = saved


def model_parallel_size() -> int:
    return fs_init.get_model_parallel_world_size()


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n/M] on each rank -> [..., n] on every rank, rank 0's part first."""
    group = fs_init.get_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the model-parallel ranks (in place)."""
    dist.all_reduce(x, group=fs_init.get_model_parallel_group())
    return x


def no_collective(x: torch.Tensor) -> torch.Tensor:
    return x


class ParallelLinear(nn.Module):
    """y = combine(x @ W.T) for this rank's weight slice W [rows, cols]. `combine` is the
    collective that joins the ranks' results. The product is F.linear on `weight`, or, once
    the layer is quantized (llama.model.quantize), its `kernel`: a module holding the same
    slice quantized, which computes x @ W.T from it. Quantizing swaps the product only; the
    layer, its collective and its place in the model stay."""

    def __init__(self, rows: int, cols: int, combine: Collective):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)
        self.combine = combine
        self.kernel: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.combine(self.kernel(x))
        return self.combine(float_product(x, self.weight))

    def use_kernel(self, kernel: nn.Module) -> None:
        """Compute the product with `kernel` from now on; the float weight is let go."""
        del self.weight
        self.kernel = kernel


def float_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a float weight: F.linear, or within measured_small_products() the
    kernel measured fastest for a few rows on the CPU."""
    if _SMALL_PRODUCTS_MEASURED[0] and x.device.type == "cpu" and 1 < x.numel() // x.shape[-1] <= \
            native.MAX_NATIVE_ROWS and x.dtype == weight.dtype in _FLOAT_LAYOUTS and \
            weight.shape[1] % native.BLOCK == 0 and weight.is_contiguous():
        return native.linear(x, weight, _FLOAT_LAYOUTS[x.dtype])
    return F.linear(x, weight)


def fuse_weights(layers: Sequence[ParallelLinear]) -> Optional[torch.Tensor]:
    """One weight holding the weights of `layers` (column-parallel layers reading the same input,
    no collective) one after another, so that one product computes all of theirs; each layer's
    weight becomes a view of its rows, so its name, the state_dict and load_state_dict stay as
    they were, and no memory is added. None (nothing changed) where a layer is quantized."""
    if any(layer.kernel is not None or layer.combine is not no_collective for layer in layers):
        return None
    fused = torch.cat([layer.weight for layer in layers])
    offset = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[offset: offset + rows], requires_grad=False)
        offset += rows
    return fused


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks (dim 0 of the weight)."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False):
        size = model_parallel_size()
        super().__init__(out_features // size, in_features,
                         gather_last_dim if gather_output and size > 1 else no_collective)


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks (dim 1 of the weight); partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int):
        size = model_parallel_size()
        super().__init__(out_features, in_features // size, all_reduce if size > 1 else no_collective)


class ParallelEmbedding(nn.Module):
    """Embedding dim split across ranks (Meta's Llama 2 layout). tokens [B, S] -> [B, S, dim]."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        size = model_parallel_size()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim // size), requires_grad=False)
        self.combine = gather_last_dim if size > 1 else no_collective

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.combine(F.embedding(tokens, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Vocabulary split across ranks (Meta's Llama 3 layout). tokens [B, S] -> [B, S, dim]."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        size = model_parallel_size()
        rows = num_embeddings // size
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim), requires_grad=False)
        self.start, self.end = model_parallel_rank() * rows, (model_parallel_rank() + 1) * rows
        self.split = size > 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return F.embedding(tokens, self.weight)
        elsewhere = (tokens < self.start) | (tokens >= self.end)  # another rank embeds these
        local = F.embedding((tokens - self.start).masked_fill(elsewhere, 0), self.weight)
        return all_reduce(local.masked_fill(elsewhere.unsqueeze(-1), 0))
