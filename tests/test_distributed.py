"""distributed.py: two real gloo ranks on the CPU add their per-position sums (different lengths, padded) and
gather objects in rank order; a world of one changes nothing."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_stream.distributed import World, all_reduce_sums, current_world, gather
from fused_stream.metrics import PositionSums

NAMES = ["codebook_0", "text"]


def _sums(rank: int) -> PositionSums:
    """Rank 0 holds 3 frames of one sequence, rank 1 5 frames of two: planted values that add up by hand."""
    frames = 3 + 2 * rank
    sums = torch.arange(2 * frames, dtype=torch.float64).view(2, frames) + 10 * rank
    return PositionSums(NAMES, sums, torch.full((2, frames), rank + 1, dtype=torch.int64), rank + 1)


def _rank(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = current_world()
        total = all_reduce_sums(_sums(rank), world)
        out[rank] = (world.rank, world.size, world.shard, total.sums, total.counts, total.n_sequences,
                     gather(f"rank {rank}", world))
    finally:
        dist.destroy_process_group()


def test_two_ranks_add_their_sums_and_gather(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    # Hand sums: rank 0's [2, 3] padded with zeros to 5 frames, plus rank 1's [2, 5].
    zero = torch.zeros(2, 5, dtype=torch.float64)
    zero[:, :3] = torch.arange(6, dtype=torch.float64).view(2, 3)
    expected = zero + torch.arange(10, dtype=torch.float64).view(2, 5) + 10
    counts = torch.tensor([[3, 3, 3, 2, 2]] * 2)
    for rank in (0, 1):
        got_rank, size, shard, sums, got_counts, n, gathered = results[rank]
        assert (got_rank, size, shard) == (rank, 2, (rank, 2))
        assert torch.equal(sums, expected) and torch.equal(got_counts, counts) and n == 3
        assert gathered == ["rank 0", "rank 1"]


def test_a_world_of_one_is_the_identity():
    world = current_world()  # no process group in this process
    assert world == World() and world.is_main and world.shard is None
    sums = _sums(0)
    assert all_reduce_sums(sums, world) is sums and gather(7, world) == [7]
    assert world.device("auto") is None and world.device("cpu") == "cpu"
