"""Worker for tests/test_exit.py (under torchrun, 4 ranks): two model-parallel replicas of 2
ranks, where replica 1 finishes at once and exits while replica 0 still works. Joins the
group the way Llama.build does and, like Meta's example scripts, never leaves it itself."""

import time

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.runtime.distributed import init_distributed

ctx = init_distributed(model_parallel_size=2, device="cpu")
group = fs_init.get_model_parallel_group()
dist.all_reduce(torch.ones(8), group=group)
if ctx.data_parallel_rank == 0:  # still working while the other replica's processes exit
    time.sleep(1.0)
    for _ in range(50):
        dist.all_reduce(torch.ones(1000), group=group)
