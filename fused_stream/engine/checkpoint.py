"""Bounded loss: the state of a batch in the middle of its stream, saved between calls and restored exactly.

Why: a batch's losses reach the caller only after its last call, and one LibriLight book is up to 45k frames, so
saving at batch ends alone can lose hours. Every `checkpoint_every` seconds of streaming (host clock, checked
between two calls: never inside a step or a captured graph) the driver copies to the host everything that moves from
one call to the next — every module's streaming state (`state_snapshot.streaming_state_slots`: the KV ring caches
with their offsets and masks, TTT fast weights, moshi's Python counters), the stream's device counter `pos`, its
loss buffer so far and its loss counters, and the host call count that picks the ring's key count — and hands it to
a `StreamCheckpoints` store (the CLI's `OUT/partial/<model>/batch_in_progress.torch`). A later run that streams the
same sequences in the same batch order opens the stream, resets it as for any batch, copies this state back *into*
the same tensors (in place: a captured graph's addresses stay valid) and goes on from that call. The next calls then
see exactly the tensors and counts they would have seen: the resumed batch's losses are bit-identical to an
uninterrupted run's on a deterministic device (tested on the CPU).

Cost: one host copy of the state per save (Moshi 7B: 1.6 GB of KV cache per sequence). The interval grows to at
least `SAVE_SHARE` times the last save's duration, so saving never takes more than 1/SAVE_SHARE of the run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from typing import Any, Protocol

import torch

from ..core.inputs import batches_by_length
from ..patches.state_snapshot import streaming_state_slots

__all__ = ["Checkpointer", "StreamCheckpoints", "capture_state", "continue_saved", "restore_state", "saved_batch_first",
           "sequence_digest"]

log = logging.getLogger(__name__)

SAVE_SHARE = 10  # a save may take at most 1/10 of the time between saves
FORMAT = 1  # bumped when the saved layout changes: an older state is then ignored (its batch is redone)


class StreamCheckpoints(Protocol):
    """Where the driver keeps the one mid-batch state of a run (at most one batch streams at a time)."""

    def load_stream(self) -> dict[str, Any] | None: ...  # the saved state, or None

    def save_stream(self, state: dict[str, Any]) -> None: ...  # replaces the saved state (atomically)

    def clear_stream(self) -> None: ...  # the batch completed: its state is no longer needed


def sequence_digest(codes: torch.Tensor) -> str:
    """What identifies a sequence in a saved state: sha256 of its codes [K, T] as int64 (one host copy)."""
    return hashlib.sha256(codes.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def capture_state(stream: Any, digests: list[str]) -> dict[str, Any]:
    """The host copy of `stream` (an `engine.stream.Stream`) between two calls, for the batch of `digests` (rows)."""
    written = stream.lead + stream.calls_done * stream.frames_per_call  # loss columns the calls so far can write
    tensors, values = {}, {}
    for path, (_, _, value) in streaming_state_slots(stream.model).items():
        if isinstance(value, torch.Tensor):
            tensors[path] = _host(value)
        else:
            values[path] = value
    return {
        "format": FORMAT,
        "digests": list(digests),
        "shape": {"batch_size": stream.batch_size, "chunk": stream.chunk, "unroll": stream.unroll,
                  "n_calls": stream.n_calls},
        "calls_done": stream.calls_done,
        "frames_done": stream.calls_done * stream.frames_per_call,
        "frames_total": stream.n_calls * stream.frames_per_call,
        "pos": _host(stream.pos),
        "counts": _host(stream.counts),
        "losses": _host(stream.losses[:, :, :written]),
        "state_tensors": tensors,
        "state_values": values,
    }


def restore_state(stream: Any, state: dict[str, Any]) -> None:
    """Copy `state` into the freshly loaded and reset `stream`, in place; ValueError (nothing to trust: the caller
    redoes the batch) when it was saved from a stream of another shape or model structure."""
    shape = {"batch_size": stream.batch_size, "chunk": stream.chunk, "unroll": stream.unroll,
             "n_calls": stream.n_calls}
    if state.get("format") != FORMAT or state.get("shape") != shape:
        raise ValueError(f"saved for a stream {state.get('shape')}, this one is {shape}")
    slots = streaming_state_slots(stream.model)
    tensors, values = state["state_tensors"], state["state_values"]
    if set(tensors) | set(values) != set(slots):
        missing = sorted(set(slots) ^ (set(tensors) | set(values)))
        raise ValueError(f"the model's streaming state differs ({', '.join(missing[:3])})")
    for path, saved in tensors.items():
        live = slots[path][2]
        if not isinstance(live, torch.Tensor) or live.shape != saved.shape or live.dtype != saved.dtype:
            raise ValueError(f"{path}: saved {tuple(saved.shape)} {saved.dtype}, the stream has {_kind(live)}")
    losses = state["losses"]
    if losses.shape[:2] != stream.losses.shape[:2] or losses.shape[2] > stream.losses.shape[2]:
        raise ValueError(f"loss buffer: saved {tuple(losses.shape)}, the stream has {tuple(stream.losses.shape)}")
    # Checked everything first: from here on nothing fails half way.
    for path, saved in tensors.items():
        slots[path][2].copy_(saved)
    for path, value in values.items():
        holder, key, _ = slots[path]
        if isinstance(holder, list):
            holder[key] = value
        else:
            setattr(holder, key, value)
    stream.pos.copy_(state["pos"])
    stream.counts.copy_(state["counts"])
    stream.losses[:, :, : losses.shape[2]].copy_(losses)
    stream.calls_done = state["calls_done"]


def saved_batch_first(
    checkpoints: StreamCheckpoints, digests: list[str], lengths: list[int], queue: deque[list[int]],
    batch_size: int,
) -> tuple[deque[list[int]], dict | None]:
    """The batches with the one an earlier run saved mid-stream first (its rows in its order), and that state; the
    queue unchanged and None when there is none, or it does not fit this run (it is then redone, with a warning)."""
    state = checkpoints.load_stream()
    if state is None:
        return queue, None
    free = {}
    for i, digest in enumerate(digests):
        free.setdefault(digest, []).append(i)
    saved_digests = state.get("digests") or []
    rows = [free[d].pop(0) for d in saved_digests if free.get(d)]
    if not rows:  # a batch that was saved whole after its last save: nothing of it is left to do
        return queue, None
    if len(rows) != len(saved_digests) or len(rows) > batch_size:
        why = "its sequences are not all among these" if len(rows) != len(saved_digests) else (
            f"its batch of {len(saved_digests)} exceeds this run's batch size {batch_size}")
        log.warning("a batch saved mid-stream by an earlier run is not continued (%s): its sequences are redone",
                    why)
        return queue, None
    rest = sorted(set(range(len(lengths))) - set(rows))
    batches = [rows] + [[rest[j] for j in part] for part in batches_by_length([lengths[i] for i in rest], batch_size)]
    return deque(batches), state


def continue_saved(stream: Any, saved: dict | None) -> int:
    """Restore a saved mid-stream state into the loaded `stream`; the calls already done (0: start over)."""
    if saved is None:
        return 0
    try:
        restore_state(stream, saved)
    except ValueError as exc:
        log.warning("the batch saved mid-stream by an earlier run cannot be continued (%s): it is redone", exc)
        stream.reset()
        return 0
    log.info("continuing a batch saved mid-stream: %d of %d frames were streamed before", saved["frames_done"],
             stream.n_calls * stream.frames_per_call)
    return stream.calls_done


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy that later steps cannot change (`.cpu()` of a CPU tensor would be the tensor itself)."""
    return tensor.detach().to("cpu", copy=True)


def _kind(value: Any) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


class Checkpointer:
    """When and what to save while a batch streams: a save is due `every` seconds after the batch started or after
    the last save (host clock), and at least `SAVE_SHARE` times the last save's duration after it (every=0: after
    every call)."""

    def __init__(self, store: StreamCheckpoints, every: float) -> None:
        self.store, self.every = store, every
        self.interval = every
        self.last = time.monotonic()
        self.saves = 0
        self.failed: list[str] = []  # why saves failed (a full disk): the run goes on, the bound is then weaker
        self.seconds = 0.0
        self.max_interval = every

    def start_batch(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, stream: Any, digests: list[str]) -> None:
        start = time.monotonic()
        try:
            self.store.save_stream(capture_state(stream, digests))
        except OSError as exc:  # a full or lost disk must not end a run hours in; the previous save stays
            self.failed.append(f"call {stream.calls_done}: {type(exc).__name__}: {exc}")
            log.warning("could not save the batch in progress (%s): an interrupt now redoes this batch from its "
                        "last saved state, if any; trying again in %.0f s", exc, self.interval)
            self.last = time.monotonic()
            return
        took = time.monotonic() - start
        self.saves += 1
        self.seconds += took
        # every=0 is the explicit "after every call" (tests, a debugging run): the cost is then the caller's choice.
        self.interval = max(self.every, SAVE_SHARE * took) if self.every > 0 else 0.0
        self.max_interval = max(self.max_interval, self.interval)
        self.last = time.monotonic()
        log.debug("stream state saved at call %d of %d (%.2f s; next in %.0f s)", stream.calls_done, stream.n_calls,
                  took, self.interval)

    def report(self) -> dict[str, Any]:
        return {"every_seconds": self.every, "saves": self.saves, "save_seconds": self.seconds,
                "longest_interval_seconds": self.max_interval, "failed_saves": self.failed}
