"""Many GPUs, many nodes: `torchrun --nproc_per_node=N -m fused_stream.eval ...`.

Every rank lists the same files and takes its share, balanced by length (`data.assign_shards`), evaluates it on
its own device (cuda:LOCAL_RANK, or the CPU), then the float64 per-position sums and counts of all ranks are added
with `all_reduce` (NCCL on GPUs, gloo on CPUs). Rank 0 writes the outputs. Without torchrun (no WORLD_SIZE in the
environment) this is a world of one and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..metrics import PositionSums


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.size) if self.size > 1 else None

    def device(self, setting: str) -> str | None:
        """This rank's device: each rank its own GPU under torchrun; `setting` as given otherwise."""
        if self.size > 1 and setting in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return None if setting == "auto" else setting

    def close(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()


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


def all_reduce_sums(sums: PositionSums, world: World) -> PositionSums:
    """The sum over ranks of every rank's PositionSums (padded to the longest rank's frame count)."""
    if world.size == 1:
        return sums
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    device = f"cuda:{world.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    frames = torch.tensor([sums.frames], dtype=torch.int64, device=device)
    dist.all_reduce(frames, op=dist.ReduceOp.MAX)
    padded = _pad(sums, int(frames))
    totals = [padded.sums.to(device), padded.counts.to(device),
              torch.tensor([padded.n_sequences], dtype=torch.int64, device=device)]
    for tensor in totals:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return PositionSums(names=list(sums.names), sums=totals[0].cpu(), counts=totals[1].cpu(),
                        n_sequences=int(totals[2]))


def _pad(sums: PositionSums, frames: int) -> PositionSums:
    S = len(sums.names)
    zeros = PositionSums(names=list(sums.names), sums=torch.zeros(S, frames, dtype=torch.float64),
                         counts=torch.zeros(S, frames, dtype=torch.int64), n_sequences=0)
    return sums.add(zeros)


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
