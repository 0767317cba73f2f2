"""CUDA Graphs for the streaming step: capture once per (B, C) shape (and per fill bucket of the ring attention,
`steps.RingSteps`), replay every step, verify bit for bit.

A graph replays recorded kernels on recorded addresses, so it repeats exactly the device work of the captured
step: the gather by the device counter, the model, the loss kernel and the counter's advance. It does not repeat
Python: an attribute a module bumps on the host (moshi's host-side offset counter) moves once, at capture. The
`Stream` therefore allocates every tensor before capture and resets in place, so one graph serves all batches of
its shape.

Capture recipe (`CUDAGraphed`, a small wrapper around any no-argument callable, like moshi's own `CUDAGraphed`):
warm up on the run's capture stream (cuBLAS workspaces, Triton compilation, moshi's lazy torch.compile), reset,
capture one call into one graph in the run's shared memory pool, reset again (capture moved Python state).
If capture fails — a module that reads a device value on the host, a data-dependent shape — the step runs eagerly
and one log line says why; `cuda_graphs="on"` raises instead.

Rehearsal (`cuda_graphs="rehearse"`, any device, CPU included): the same control flow — warm-up, capture
bookkeeping, replay, verification, reset between batches, out-of-memory path — with eager calls where capture and
replay would be. Each rehearsed replay checks what a real one relies on (`_RehearsedGraph`): every tensor of the
Stream and of the model (attributes, parameters, buffers, streaming state) keeps the address and shape it had at
capture, and no Python value the step depends on moves. A violation raises GraphCaptureError, so a CPU-only CI
catches what would otherwise be a silently wrong (or crashing) first GPU run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import FusedStreamError
from ..patches.state_snapshot import Finding, compare, format_findings, harmless_reason, leaf_of, snapshot

log = logging.getLogger(__name__)

WARMUP_CALLS = 3  # eager calls before capture: Triton autotune/compile, cuBLAS handles, inductor's lazy compile


class GraphCaptureError(FusedStreamError, RuntimeError):
    """cuda_graphs="on" (or "rehearse") and the step could not be captured, or a rehearsed replay found a tensor
    moved or a Python value changed that a real replay would not follow."""


class GraphMismatchError(FusedStreamError, AssertionError):
    """verify_graph found a replayed loss that differs from the eager one."""


class GraphPool:
    """What the graphs of one run share: a memory pool, the stream they are captured on, and their lifetime.

    Graphs stay alive until `close()` (the end of the run), even after their Stream is closed: a graph destroyed
    mid-run could drop the pool's use count to zero while blocks remain in it, and the next capture into the same
    pool would trip the caching allocator's assertion. A retired graph is never replayed; later captures in the
    same pool reuse its (free) blocks, which is what sharing a pool is for. After one failed capture the rest of
    the run stays eager: the allocator's state after a failed capture is not worth betting a second one on.
    """

    def __init__(self, device: torch.device, *, rehearse: bool = False) -> None:
        self.device, self.rehearse = device, rehearse
        # A rehearsal touches no CUDA API: no memory pool, no capture stream.
        self.handle = None if rehearse else torch.cuda.graph_pool_handle()
        self.cuda_stream = None if rehearse else torch.cuda.Stream(device=device)  # warm-up and capture
        # CUDA graphs; for a rehearsal, a description of each rehearsed capture (its checks end with its Stream).
        self.graphs: list[Any] = []
        self.failure: str | None = None

    @property
    def mode(self) -> str:
        return "rehearse" if self.rehearse else "on"

    def close(self) -> None:
        self.graphs.clear()


class CUDAGraphed:
    """`graphed()` replays a CUDA graph of `fn` once `capture()` worked, and calls `fn` eagerly otherwise.

    `fn` takes no arguments and works only on tensors allocated before capture (a `Stream.step`); `reset` puts
    those tensors back to the start of the loaded batch, in place. `pool` is None when graphs are off. With a
    rehearsing pool, "capture" and "replay" are eager calls of `fn`, checked against `watch` (the `Stream` whose
    step `fn` is: its tensors and its model's); without `watch` only the control flow is rehearsed.
    """

    def __init__(self, fn: Callable[[], None], reset: Callable[[], None], pool: GraphPool | None, *,
                 strict: bool = False, reason: str = "captured", watch: Any = None) -> None:
        self.fn, self.reset, self.pool, self.strict, self.watch = fn, reset, pool, strict, watch
        self.graph: torch.cuda.CUDAGraph | _RehearsedGraph | None = None
        self.reason = reason  # why this runs graphed or eagerly, for the report
        self.capture_seconds = 0.0

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()  # a CUDA graph, or a rehearsed one (an eager call, checked)
        else:
            self.fn()

    def capture(self) -> None:
        """Warm up, capture one call of `fn`, reset. On failure run eagerly (or raise GraphCaptureError if strict).

        An out-of-memory error (torch.cuda.OutOfMemoryError, or MemoryError from the host allocator) is re-raised
        as is: it is not a property of the model but of the batch size, and the caller's out-of-memory path (free,
        halve the batch, retry) must handle it with graphs still on.
        """
        pool = self.pool
        if pool is None:
            return
        if pool.failure is not None:
            self.reason = f"not captured: an earlier capture of this run failed ({pool.failure})"
            return
        start = time.perf_counter()
        try:
            if pool.rehearse:
                graph = _RehearsedGraph(self.fn, self.watch)
                for _ in range(WARMUP_CALLS):
                    self.fn()
                self.reset()
                graph.capture()
                pool.graphs.append(f"rehearsed capture {len(pool.graphs) + 1}")
            else:
                graph = self._capture_cuda(pool)
                pool.graphs.append(graph)
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly (or raise if strict)
            if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
                raise
            self.reason = f"capture failed, running eagerly: {type(error).__name__}: {_first_line(error)}"
            pool.failure = self.reason
            if self.strict:
                raise GraphCaptureError(
                    f"cuda_graphs={pool.mode!r} but the step cannot be captured: {error}"
                ) from error
            log.warning("CUDA graph %s", self.reason)
        if not pool.rehearse:
            torch.cuda.synchronize(pool.device)
        self.reset()  # capture ran the step's Python once (and warm-up ran it for real)
        self.capture_seconds = time.perf_counter() - start

    def _capture_cuda(self, pool: GraphPool) -> torch.cuda.CUDAGraph:
        device = pool.device
        began = ended = False
        try:
            with torch.cuda.device(device):
                pool.cuda_stream.wait_stream(torch.cuda.current_stream(device))
                # Warm up on the capture CUDA stream itself: library workspaces (cuBLAS) are per CUDA stream, so they
                # are allocated now, outside the graph pool, instead of during capture.
                with torch.cuda.stream(pool.cuda_stream):
                    for _ in range(WARMUP_CALLS):
                        self.fn()
                    self.reset()
                torch.cuda.synchronize(device)
                # As torch.cuda.graph does before capture_begin: return the blocks the warm-up left cached, so the
                # capture's allocations in the pool do not run out of memory beside them.
                gc.collect()
                torch.cuda.empty_cache()
                graph = torch.cuda.CUDAGraph()
                # The outer CUDA-stream context restores the current CUDA stream even if capture_end raises.
                # thread_local: the memory monitor's thread may query NVML / torch while this one captures.
                with torch.cuda.stream(pool.cuda_stream):
                    graph.capture_begin(pool.handle, capture_error_mode="thread_local")
                    began = True
                    try:
                        self.fn()
                    except BaseException:
                        with contextlib.suppress(Exception):  # an invalidated capture makes capture_end raise too
                            graph.capture_end()
                            ended = True
                        raise
                    graph.capture_end()
                    ended = True
            return graph
        except BaseException:
            if began and not ended:
                _abandon_capture(device, pool.handle)
            raise


class _RehearsedGraph:
    """Stands in for a captured graph on any device: `capture()` and `replay()` call `fn` eagerly and check what a
    real capture and replay rely on, raising GraphCaptureError at the first violation.

    Checked around every call (two snapshots of the Stream and its model; only rehearsal pays for them):
    - every tensor keeps the address (data and storage) and shape it had at capture: a replay reads and writes
      the captured addresses, so a tensor rebound by the step, by `reset()` or by `load()` would be left behind;
    - no Python value moves during a call (a replay would not repeat the change), nor between capture and a
      replay (a replay would not see the new value); graphsafe's known-harmless moshi cases excepted.
    """

    def __init__(self, fn: Callable[[], None], watch: Any) -> None:
        self.fn, self.watch = fn, watch
        self.modules = dict(watch.model.named_modules()) if watch is not None else {}
        self.captured: dict | None = None  # the snapshot before the captured call: what every replay must match
        self.replays = 0

    def capture(self) -> None:
        before = self._snapshot()
        self.fn()
        self._check(before, self._snapshot(), "during the captured call")
        self.captured = before

    def replay(self) -> None:
        self.replays += 1
        before = self._snapshot()
        if self.captured is not None:
            self._check(self.captured, before, f"between capture and replay {self.replays}")
        self.fn()
        self._check(before, self._snapshot(), f"during replay {self.replays}")

    def _snapshot(self) -> dict:
        if self.watch is None:
            return {}
        out = snapshot(self.watch.model)
        for name, value in vars(self.watch).items():
            leaf = leaf_of(value)
            if leaf is not None and name not in _HOST_ONLY:
                out[(STREAM, name)] = leaf
        return out

    def _check(self, before: dict, after: dict, when: str) -> None:
        bad = []
        for module, attribute, kind, old, new in compare(before, after):
            owner = self.modules.get(module)
            if kind == "python_value" and owner is not None and harmless_reason(owner, attribute, kind):
                continue
            bad.append(Finding(module if module != STREAM else "<stream>", attribute, kind, f"{old} -> {new}"))
        if bad:
            raise GraphCaptureError(
                f"cuda_graphs='rehearse': {when}, state a CUDA graph replay depends on moved (a real replay would "
                f"use the captured tensors and values):\n{format_findings(bad)}"
            )


STREAM = "\0stream"  # the snapshot's module name for the Stream's own attributes (no module can be named so)
# Stream attributes the step never reads: the driver's host-side call counts (`calls_done` picks the fill bucket of
# steps.RingSteps outside the captured call; the count a step depends on is `attend_frames`, checked).
_HOST_ONLY = frozenset({"n_calls", "calls_done"})


def _abandon_capture(device: torch.device, handle: Any) -> None:
    """Undo what capture_begin set up in the caching allocator when capture_end never completed.

    capture_end raises at cudaStreamEndCapture before it tells the allocator to stop routing this stream's
    allocations into the pool, and an un-ended graph never releases its pool on destruction; torch's own
    cudagraph trees make these two calls in the same situation.
    """
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        with contextlib.suppress(Exception):
            getattr(torch._C, name)(device.index, handle)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def verify_replay(graphed: Callable[[], None], stream: Any, calls: int, names: list[str],
                  eager: Callable[[], None] | None = None) -> int:
    """Run `calls` calls of `eager` (default `stream.step`) and of `graphed` (its replay) from the same start; the
    losses must be bit-identical.

    Returns the number of calls compared (at most the loaded batch's). Raises GraphMismatchError naming the first
    differing (batch, stream, position). Leaves the stream reset to the start of its batch. Without a graph (CPU,
    failed capture) it compares two eager runs: a reset stream must then be bit-identical to itself.
    """
    calls = max(1, min(calls, stream.n_calls))
    reference = _run_from_start(stream, eager or stream.step, calls)
    candidate = _run_from_start(stream, graphed, calls)
    stream.reset()
    first_difference(reference, candidate, names, stream.lead)
    return calls


def _run_from_start(stream: Any, step: Callable[[], None], calls: int) -> torch.Tensor:
    stream.reset()
    for _ in range(calls):
        step()
    return stream.losses.clone()


def first_difference(reference: torch.Tensor, candidate: torch.Tensor, names: list[str], lead: int) -> None:
    """Raise GraphMismatchError at the first (batch, stream, position) whose bits differ; NaN == NaN by bits."""
    a, b = reference.contiguous().view(torch.int32), candidate.contiguous().view(torch.int32)
    differs = a != b
    if not bool(differs.any()):
        return
    # The first by position (time), then batch row, then stream: where a replay first went wrong.
    batch, stream, column = min(differs.nonzero().tolist(), key=lambda bsc: (bsc[2], bsc[0], bsc[1]))
    raise GraphMismatchError(
        f"CUDA graph replay differs from eager at (batch {batch}, {names[stream]}, position {column - lead}): "
        f"eager {reference[batch, stream, column].item()!r}, replay {candidate[batch, stream, column].item()!r}"
    )
