"""`RingSteps`: the driver's step for one `Stream`: one captured step per fill bucket of the ring attention.

The ring attention (`patches/ring_attention.py`) attends over `Stream.attend_frames` slots; `RingSteps` sets that
count around each call from the host call count, rounded up to a fill bucket, and holds one `CUDAGraphed` of the
stream's step per bucket (or runs the same calls eagerly, rounding the same way, so that graphed and eager runs
compute the same thing).
"""

from __future__ import annotations

import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from ..patches.ring_attention import fill_buckets
from .graphs import CUDAGraphed, GraphPool

__all__ = ["RingSteps"]


class RingSteps:
    """The driver's step for one `Stream`: sets `attend_frames` from the host call count around each call.

    Interface of `graphs.CUDAGraphed` (`capture()`, `graphed`, `reason`, `capture_seconds`, a call is one step)
    plus `eager`, the same calls without graphs (the reference of `graphs.verify_replay`, bit for bit). Every call
    attends over its fill bucket, graphed or not (see the module docstring). `pool` None: eager calls. A pool: one
    `CUDAGraphed` of `stream.step` per fill bucket. `bucket_calls[i]`: the calls of bucket i since the stream opened
    (replayed, rehearsed or eager): which captured steps a run has exercised.
    """

    def __init__(self, stream: Any, pool: GraphPool | None, *, strict: bool = False,
                 reason: str = "captured") -> None:
        self.stream, self.pool, self.reason = stream, pool, reason
        ring = stream.attention.capacity
        self.ring_capacity = ring
        self.buckets = (fill_buckets(ring, stream.capacity, stream.frames_per_call, chunk=stream.chunk)
                        if stream.attention.cutting else [None])  # no cut: one whole-ring step
        self.graphs: list[CUDAGraphed] = [] if pool is None else [
            CUDAGraphed(stream.step, stream.reset, pool, strict=strict, reason=reason, watch=stream)
            for _ in self.buckets]
        self.bucket_calls = [0] * len(self.buckets)
        self.calls_past = 0  # calls past every bucket (whole ring)
        self.capture_seconds = 0.0

    def slots_read(self) -> tuple[int, int]:
        """(ring slots attended, summed over the steps of every call since the stream opened; those steps): what
        one sequence's attention read per layer, for the throughput report's bytes per frame."""
        stream, ring = self.stream, self.ring_capacity
        unroll = stream.frames_per_call // stream.chunk
        if ring <= 0:
            return 0, 0
        total = self.calls_past * unroll * ring
        for frames, calls in zip(self.buckets, self.bucket_calls, strict=True):
            per_call = sum(ring if frames is None else min(ring, frames - (unroll - 1 - u) * stream.chunk)
                           for u in range(unroll))
            total += calls * per_call
        return total, (sum(self.bucket_calls) + self.calls_past) * unroll

    @property
    def graphed(self) -> bool:
        return bool(self.graphs) and all(graph.graphed for graph in self.graphs)

    def capture(self) -> None:
        """Warm up and capture each bucket's step with its key count (each capture resets the stream)."""
        start = time.perf_counter()
        for frames, graph in zip(self.buckets, self.graphs, strict=False):  # pool None: no graphs
            with self._attending(frames):
                graph.capture()
        self.capture_seconds = time.perf_counter() - start
        if self.graphs:
            failed = [graph.reason for graph in self.graphs if not graph.graphed]
            self.reason = failed[0] if failed else self.graphs[0].reason

    def __call__(self) -> None:
        self._call(replay=True)

    def eager(self) -> None:
        """The same call as `__call__`, bucket included, run eagerly."""
        self._call(replay=False)

    def _call(self, replay: bool) -> None:
        stream = self.stream
        # Keys in each ring once this call has written (uncapped: `Stream.step` counts C fewer per earlier step, and
        # the attention keeps the whole ring for counts >= its capacity).
        fill = (stream.calls_done + 1) * stream.frames_per_call
        index = bisect_left(self.buckets, fill, key=lambda b: math.inf if b is None else b)
        if index < len(self.buckets):
            step = self.graphs[index] if replay and self.graphs else stream.step
            frames = self.buckets[index]
            self.bucket_calls[index] += 1
        else:  # past every bucket (only a call past the stream's capacity): the whole ring, eagerly
            step, frames = stream.step, None
            self.calls_past += 1
        with self._attending(frames):
            step()
        stream.calls_done += 1

    @contextlib.contextmanager
    def _attending(self, frames: int | None) -> Iterator[None]:
        # Set around the call, never inside the captured function: a graph's key count is part of the graph.
        self.stream.attend_frames = frames
        try:
            yield
        finally:
            self.stream.attend_frames = None
