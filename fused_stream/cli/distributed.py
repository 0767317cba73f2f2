"""Many GPUs, many nodes: `torchrun --nproc_per_node=N -m fused_stream.eval ...`.

`init_world` joins torchrun's process group; `World` and the all-reduce of the sums are the library's
(`fused_stream.distributed`, shared with the drop-in). Every rank lists the same files and takes its share, balanced
by length (`data.assign_shards`), evaluates it on its own device (cuda:LOCAL_RANK, or the CPU), then the float64
per-position sums and counts of all ranks are added with `all_reduce` (NCCL on GPUs, gloo on CPUs). Rank 0 writes the
outputs. Without torchrun (no WORLD_SIZE in the environment) this is a world of one and nothing is initialised.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed import World, all_reduce_sums, gather

__all__ = ["World", "all_reduce_sums", "gather", "init_world"]


def init_world(device_setting: str) -> World:
    """Join the torchrun process group when launched by torchrun; a world of one otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device_setting in ("auto", "cuda") and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, initialised=True)
