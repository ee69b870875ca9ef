"""Checkpoints in Meta's layout, from files to this rank's weights: params.json (params),
the weights' names, shapes and split axes (layout), finding and opening the shards and
cutting each rank's slice from any number of them (shards, pages), and foreign formats
converted into the layout (convert)."""

from .layout import check_divisible, check_shards, check_weights_fit, parallel_axis, save_checkpoint, split_state_dict
from .params import check_params, load_params
from .shards import (
                     find_shards,
                     load_rank_state_dict,
                     open_shard,
                     open_shards,
                     shards_for_rank,
                     vocab_parallel_embedding,
)

__all__ = ["load_params", "check_params", "find_shards", "open_shard", "open_shards", "shards_for_rank",
           "vocab_parallel_embedding", "check_divisible", "check_shards", "check_weights_fit", "parallel_axis",
           "load_rank_state_dict", "split_state_dict", "save_checkpoint"]
