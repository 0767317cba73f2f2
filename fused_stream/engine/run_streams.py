"""`RunStreams`: the run's current `Stream` and its captured steps, reopened when the batch shape changes.

Why apart from the driver: the driver decides what runs (batches, verification, out-of-memory retries); this holds
what a batch runs on, the Stream, its `RingSteps` (one captured step per fill bucket) and the graph pool, and checks
once per run that the model's modules are safe to capture.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.config import Plan
from ..patches.state_snapshot import format_findings, unsafe
from .graphs import GraphCaptureError, GraphPool, verify_replay
from .graphsafe import check_stream
from .steps import RingSteps
from .stream import Stream

__all__ = ["RunStreams"]

log = logging.getLogger(__name__)


class RunStreams:
    """The run's current Stream and its RingSteps (CUDAGraphed steps); reopened (recaptured) when (B, capacity) changes.

    Batches come longest first, so a run opens a Stream for its first batch and reuses it (copy in, reset in place,
    replay) until the batch size changes (the last, smaller batch). Graphs of the run share one `GraphPool`.
    """

    def __init__(self, model: LMModel, plan: Plan, verify_graph: int) -> None:
        self.model, self.plan, self.verify_graph = model, plan, verify_graph
        self.graphs, self.reason = plan.graphs, plan.graph_reason
        self.pool = GraphPool(plan.device, rehearse=plan.rehearse) if plan.graphs else None  # one per run
        self.safety_checked = False
        self.stream: Stream | None = None
        self.step: RingSteps | None = None
        self.names = ["text"] + [f"audio codebook {k}" for k in range(model.dep_q)]
        self.opened = self.captures = self.verified_calls = self.max_state_bytes = 0
        self.capture_seconds = self.graphed_seconds = self.eager_seconds = 0.0
        self.slots_read = self.steps_read = self.ring_slots = 0  # ring slots attended per sequence and step
        self.patches: dict[str, dict[str, Any]] = {}  # the last stream's patch verdicts, probe seconds summed

    def load(self, batch: torch.Tensor, lengths: torch.Tensor) -> tuple[Stream, RingSteps]:
        """The stream holding `batch` (opened and captured if its shape is new) and the step to call."""
        B, _, T = batch.shape
        if self.stream is not None and self.stream.fits(B, T):
            self.stream.load(batch.to(self.stream.losses.device), lengths)
            return self.stream, self.step
        self._close_stream()
        plan = self.plan
        self.stream = stream = Stream(self.model, B, plan.chunk_size, T, plan.loss_backend, unroll=plan.unroll)
        self.max_state_bytes = max(self.max_state_bytes, stream.state_bytes())
        self._add_patches(stream.patches)
        stream.load(batch.to(stream.losses.device), lengths)
        if self.graphs and not self.safety_checked:
            self._refuse_unsafe_modules(stream)
        # One captured step per fill bucket of the ring attention (ring_attention.py), or eager exact-fill calls.
        self.step = RingSteps(stream, self.pool if self.graphs else None, strict=plan.strict_graphs, reason=self.reason)
        self.step.capture()
        # Counted once captured: an out-of-memory error in warm-up or capture retries smaller, and the report must
        # still say graphed (captures == opened) when every stream that ran was captured.
        self.opened += 1
        self.capture_seconds += self.step.capture_seconds
        self.captures += self.step.graphed
        self.reason = self.step.reason if self.graphs else self.reason
        if self.verify_graph:
            self.verified_calls += verify_replay(self.step, stream, self.verify_graph, self.names, self.step.eager)
        log.debug("stream opened: B=%d, capacity %d, %s", stream.batch_size, stream.capacity, self.reason)
        return stream, self.step

    def _refuse_unsafe_modules(self, stream: Stream) -> None:
        """A module whose step changes Python state or rebinds tensors would be silently wrong under replay (a TTT
        update kept in a Python counter happens once, at capture): refuse ("on") or run eagerly, naming the modules.
        Checked on the run's own first stream, so no second copy of the streaming state is allocated."""
        self.safety_checked = True
        bad = unsafe(check_stream(stream))
        if not bad:
            return
        names = ", ".join(sorted({f.module or "<model>" for f in bad}))
        if self.plan.strict_graphs:
            mode = "rehearse" if self.plan.rehearse else "on"
            raise GraphCaptureError(f"cuda_graphs={mode!r} but these modules are not graph-safe: {names}\n"
                                    f"{format_findings(bad)}")
        self.reason = f"not captured: graph-unsafe modules ({names}), running eagerly"
        log.warning("CUDA graphs off: %s\n%s", self.reason, format_findings(bad))
        self.graphs = False

    def _add_patches(self, patches: dict[str, dict[str, Any]]) -> None:
        """Each patch's verdict on the newest stream (patches/patch_probe.py), with the run's probe seconds summed."""
        for name, verdict in patches.items():
            spent = self.patches.get(name, {}).get("probe_seconds", 0.0)
            self.patches[name] = verdict | {"probe_seconds": spent + verdict["probe_seconds"]}

    def add_time(self, graphed: bool, seconds: float) -> None:
        if graphed:
            self.graphed_seconds += seconds
        else:
            self.eager_seconds += seconds

    def report(self, setting: str) -> dict[str, Any]:
        all_captured = self.opened > 0 and self.captures == self.opened
        return {
            "setting": setting,
            "graphed": all_captured and not self.plan.rehearse,  # real CUDA graphs replayed
            "rehearsed": all_captured and self.plan.rehearse,  # the same control flow, eager calls, checked
            "reason": self.reason if self.opened else "no batch run",
            "unroll": self.plan.unroll,
            "streams_opened": self.opened,
            "captures": self.captures,
            "capture_seconds": self.capture_seconds,
            "graphed_seconds": self.graphed_seconds,
            "eager_seconds": self.eager_seconds,
            "verified_calls": self.verified_calls,
        }

    def kv_read_fraction(self) -> float | None:
        """The mean fraction of each ring the run's steps attended (filled slots, rounded up to fill buckets)."""
        return self.slots_read / (self.steps_read * self.ring_slots) if self.steps_read and self.ring_slots else None

    def _close_stream(self) -> None:
        if self.step is not None:
            slots, steps = self.step.slots_read()
            self.slots_read, self.steps_read = self.slots_read + slots, self.steps_read + steps
            self.ring_slots = max(self.ring_slots, self.step.ring_capacity)
        if self.stream is not None:
            self.stream.close()
        self.stream = self.step = None  # a retired graph lives on in the pool until close(): see GraphPool

    def close(self) -> None:
        """End of the run: the stream, then every graph of the run."""
        self._close_stream()
        if self.pool is not None:
            self.pool.close()

    def recover(self) -> None:
        """After an out-of-memory error: drop the stream, the graphs and their pool, and return cached memory."""
        self.close()
        gc.collect()
        if self.plan.device.type == "cuda":
            torch.cuda.empty_cache()
        # A fresh pool: see GraphPool.
        self.pool = GraphPool(self.plan.device, rehearse=self.plan.rehearse) if self.pool is not None else None
