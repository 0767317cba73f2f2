"""Streaming attention over the ring slots that hold keys, exactly: `RingAttention` (the driver's `RingSteps`, in
`engine/steps.py`, picks the slot count of each call).

Why: moshi's streaming attention (`StreamingMultiheadAttention.forward`, `RingKVCache.complete`) runs SDPA over
every slot of the ring (context + C - 1 after `stream.enlarge_rings`: 3000+ for Moshi) from the first frame on,
although after s frames only s slots hold keys. Until the ring wraps, `RingKVCache.complete` writes position p at
slot p, and every slot >= the frames written has position -1, which moshi's mask (`pos_k >= 0`) removes: those
slots contribute exact zeros to the softmax. Keeping only the first `frames` slots (any `frames` >= the slots
written, moshi's context and causal masks still applied to the kept ones) therefore gives moshi's result up to
float reassociation; once the ring is full (`frames` >= its capacity) nothing is cut and moshi's path runs as is.

The number of slots written is host arithmetic, never a device read: every sequence of a batch starts at position
0 after `Stream.reset()` and each `Stream.step()` writes C * U frames (padding included) into every ring, so
after call c each ring holds min(capacity, (c + 1) * C * U) keys. (moshi's `offset_cpu` would say the same in
eager mode but freezes under a CUDA graph, so it is not used.) The count lives in the driver's `RingSteps`:

- `Stream.step()` attends over `Stream.attend_frames` slots (None, its value outside `RingSteps`: the whole ring,
  moshi's path), so a direct `stream.step()` (tests, graph-safety check, eager verification) is always exact;
- `RingSteps` sets `attend_frames` around each call from `Stream.calls_done` (zeroed by every `Stream.reset()`) to
  the count rounded up to a fill bucket, with CUDA graphs (one captured step per bucket, all captured when the
  stream opens; a graph freezes the key count it was captured with), with their rehearsal, and eagerly alike.
  Rounding up is exact (the extra slots are masked) but not bit-identical to the exact count: the softmax sums
  over more (zero) terms in another order, a last-bit difference. Eager calls round the same way so that a graphed
  run and an eager run attend over the same slots and "graph == eager, bit for bit" holds on any device; the
  bucket of each call is chosen on the host.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from moshi.modules.transformer import KVCacheResult, RingKVCache, StreamingMultiheadAttention

from .shadows import InstanceShadows

__all__ = ["MAX_BUCKETS", "RingAttention", "fill_buckets"]

# Fill buckets per stream at most (+ one full-ring step when its batches wrap the ring). Each is captured (a warm-up
# and a capture) when the stream opens; the rounding costs at most capacity / MAX_BUCKETS extra keys a call.
MAX_BUCKETS = 16


class RingAttention:
    """Makes each temporal-transformer ring attention of `model` attend over the first `frames` ring slots.

    Enter it inside `model.streaming()` after the rings have their final size; leaving it restores moshi's modules
    exactly. Only `model.transformer`'s self-attentions with a `RingKVCache` are touched (not the depformer, not TTT
    layers), and only per instance: their `_complete_kv` is shadowed by an instance attribute that slices moshi's
    own result, so the rest of moshi's forward (RoPE, masks, SDPA, projections) runs unchanged.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = [m for m in model.transformer.modules() if _has_ring(m)]
        self.frames: int | None = None  # slots kept during the current call; None = the whole ring
        # False: the cut is off (`patches/patch_probe.py` found it does not reproduce moshi on these modules):
        # nothing is installed and `attending` keeps the whole ring.
        self.cutting = True
        self._shadows = InstanceShadows("_complete_kv")

    @property
    def capacity(self) -> int:
        """The largest ring's slot count (0 without ring attention)."""
        return max((m._streaming_state.kv_cache.capacity for m in self.modules), default=0)

    def install(self) -> None:
        if self._shadows:
            raise RuntimeError("RingAttention is already installed")
        if not self.cutting:
            return
        self._shadows.install({module: _Truncated(self, module, module._complete_kv) for module in self.modules})

    def uninstall(self) -> None:
        self._shadows.restore()

    def __enter__(self) -> RingAttention:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @contextlib.contextmanager
    def attending(self, frames: int | None) -> Iterator[None]:
        """Attend over the first `frames` slots inside the block (an upper bound of the slots written, counting the
        block's own writes); None: the whole ring. Restored afterwards, so nothing outside a call depends on it."""
        previous, self.frames = self.frames, frames if self.cutting else None
        try:
            yield
        finally:
            self.frames = previous


class _Truncated:
    """A ring attention's `_complete_kv`: moshi's result, cut to the first `frames` slots while the ring is not full.

    A callable object, not a closure, so the graph-safety snapshot (which skips callables) does not walk into it:
    the value a captured step depends on is `Stream.attend_frames`, which the snapshot does see.
    """

    def __init__(self, owner: RingAttention, module: StreamingMultiheadAttention, original: Any) -> None:
        self.owner, self.module, self.original = owner, module, original

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> KVCacheResult:
        result = self.original(k, v)  # writes the new keys into the ring (all slots), as moshi does
        frames = self.owner.frames
        state = self.module._streaming_state
        if frames is None or state is None or state.kv_cache is None or frames >= state.kv_cache.capacity:
            return result
        # keys/values [B, H, capacity, D] and positions [B, capacity] -> the first `frames` slots (views: no copy).
        keys, values, positions = result
        return KVCacheResult(keys[:, :, :frames], values[:, :, :frames], positions[:, :frames])



def _has_ring(module: torch.nn.Module) -> bool:
    """moshi's own causal self-attention over its own ring, nothing else: the exactness argument (empty slots hold
    position -1, masked by the causal mask) holds for those only, not for a subclass with another slot layout."""
    state = getattr(module, "_streaming_state", None)
    return (type(module) is StreamingMultiheadAttention and module.causal and not module.cross_attention
            and state is not None and type(state.kv_cache) is RingKVCache)


def fill_buckets(ring_capacity: int, stream_capacity: int, frames_per_call: int,
                 max_buckets: int = MAX_BUCKETS, chunk: int | None = None) -> list[int | None]:
    """The `attend_frames` of one stream's calls, ascending; None (the last, if present) is the whole ring.

    Edges are multiples of a width that is itself a multiple of `frames_per_call` (the fill after each call), chosen
    so that at most `max_buckets` edges reach the ring's capacity; only fills a batch of the stream reaches
    (`stream_capacity` frames) get one. A call of U = frames_per_call / chunk steps (`chunk` None: U = 1) attends,
    step u, over its edge minus (U - 1 - u) * chunk slots: the last edge may exceed the ring, and the call that wraps
    it keeps exact per-step counts for its steps before the wrap (`Stream.step`); when even its first step reaches
    the whole ring, that edge is the whole ring (None) and is not captured twice. None serves the calls after it.
    """
    if ring_capacity <= 0:
        return [None]
    chunk = frames_per_call if chunk is None else chunk
    width = math.ceil(math.ceil(ring_capacity / max_buckets) / frames_per_call) * frames_per_call
    top = min(ring_capacity, stream_capacity)  # the most keys a ring of this stream ever holds
    edges: list[int | None] = list(range(width, top, width))
    last = math.ceil(top / width) * width
    if last - (frames_per_call - chunk) >= ring_capacity:  # every step of that call attends the whole ring
        return edges + [None]
    edges.append(last)
    if stream_capacity > last:  # calls past the last edge: the ring has wrapped before they start
        edges.append(None)
    return edges
