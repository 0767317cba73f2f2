"""Ranks that share one evaluation: each takes its share of the sequences, and the per-position sums are added.

Under torchrun (`cli.distributed.init_world`) or inside a training loop whose process group is initialised, every
rank evaluates a share of the sequences balanced by length (`data.dataset.assign_shards`, the same split on every
rank without talking), then the float64 per-position sums and counts of all ranks are added with `all_reduce` (NCCL
on GPUs, gloo on CPUs), so every rank holds the metrics of the whole data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .metrics import PositionSums

__all__ = ["World", "all_reduce_sums", "current_world", "gather"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialised: bool = False  # this package initialised the process group (and destroys it on close)

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


def current_world() -> World:
    """The process group a caller (a training loop) initialised, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    local = torch.cuda.current_device() if dist.get_backend() == "nccl" else 0
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local)


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
