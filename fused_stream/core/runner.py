"""Batches through streams: one `Stream` (and its CUDA graph) per shape, reused while batches keep that shape.

Batches come longest first, so a run opens a Stream for its first batch and reuses it — copy in, reset in place,
replay — until the batch size changes (the last, smaller batch) or a batch is longer than the Stream's capacity.
Graphs of the run share one `GraphPool`; after an out-of-memory error `recover()` frees everything, pool included.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..measure.monitor import Monitor
from ..ttt.tracker import TTTTracker, ttt_modules
from .graphs import GraphCaptureError, GraphedStep, GraphPool, graphs_wanted, verify_replay
from .graphsafe import check_graph_safety, format_findings, unsafe
from .stream import Stream

log = logging.getLogger(__name__)


class StreamRunner:
    """Holds the current Stream and its GraphedStep; re-opens (and re-captures) only when (B, capacity) changes."""

    def __init__(self, model: LMModel, config: Any, backend: str) -> None:
        self.model, self.config, self.backend = model, config, backend
        self.stream: Stream | None = None
        self.graphed: GraphedStep | None = None
        device = next(model.parameters()).device
        self.pool = GraphPool(device) if graphs_wanted(config.cuda_graphs, device)[0] else None  # one per run
        self.graph_setting = config.cuda_graphs
        self.unsafe: str | None = None  # why graphs are off when the graph-safety check refused them
        if self.pool is not None:
            self._refuse_unsafe_modules()
        self.tracker = TTTTracker(model) if ttt_modules(model) else None  # per-sequence TTT statistics, on device
        self.tracked_rows = 0
        self.names = ["text"] + [f"audio codebook {k}" for k in range(model.dep_q)]
        self.opened = self.captures = 0
        self.capture_seconds = self.graphed_seconds = self.eager_seconds = 0.0
        self.verified_calls = 0
        self.max_state_bytes = 0
        self.reason = "no batch run"

    def run(
        self, batch: torch.Tensor, lengths: torch.Tensor, progress: Any, monitor: Monitor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stream one padded batch codes [B, K, T]; host tensors (audio [B, dep_q, T], text [B, 1, T], counts)."""
        B, _, T = batch.shape
        fresh = self.stream is None or not self.stream.fits(B, T)
        if fresh:
            self._open(B, T)
        stream = self.stream
        stream.load(batch.to(stream.losses.device), lengths)
        if fresh:
            self._capture(stream)
        graphed = self.graphed
        if self.tracker is not None:
            self.tracker.begin_batch()  # after load/capture: the fast weights are at their reset values
        host_lengths = lengths.tolist()
        per_call = stream.frames_per_call
        start = time.perf_counter()
        for call in range(stream.n_calls):
            graphed.step()
            lo = call * per_call  # host arithmetic only: frames of this call inside each sequence
            monitor.add_frames(sum(min(max(n - lo, 0), per_call) for n in host_lengths))
            progress.advance()
        if self.tracker is not None:
            self.tracker.end_batch()
            self.tracked_rows += B
        out = stream.host_losses(T)  # the batch's one host copy: waits for its last step
        seconds = time.perf_counter() - start
        if graphed.graphed:
            self.graphed_seconds += seconds
        else:
            self.eager_seconds += seconds
        return out

    def _open(self, batch_size: int, frames: int) -> None:
        self._close_stream()
        self.stream = Stream(self.model, batch_size, self.config.chunk_size, frames, self.backend,
                             unroll=self.config.graph_unroll)
        self.max_state_bytes = max(self.max_state_bytes, self.stream.state_bytes())
        self.opened += 1

    def _capture(self, stream: Stream) -> None:
        """Capture (needs the loaded batch for warm-up) and optionally verify replay against eager."""
        self.graphed = GraphedStep(stream, self.graph_setting, pool=self.pool)
        self.capture_seconds += self.graphed.capture_seconds
        self.captures += self.graphed.graphed
        self.reason = self.unsafe or self.graphed.reason
        if self.config.verify_graph:
            self.verified_calls += verify_replay(self.graphed, self.config.verify_graph, self.names, stream.lead)
        log.debug("stream opened: B=%d, capacity %d, %s", stream.batch_size, stream.capacity, self.reason)

    def graph_report(self) -> dict:
        return {
            "setting": self.config.cuda_graphs,
            "graphed": self.opened > 0 and self.captures == self.opened,
            "reason": self.reason,
            "unroll": self.config.graph_unroll,
            "streams_opened": self.opened,
            "captures": self.captures,
            "capture_seconds": self.capture_seconds,
            "graphed_seconds": self.graphed_seconds,
            "eager_seconds": self.eager_seconds,
            "verified_calls": self.verified_calls,
        }

    def _close_stream(self) -> None:
        if self.graphed is not None:
            self.graphed.release()
        if self.stream is not None:
            self.stream.close()
        self.stream = self.graphed = None

    def close(self) -> None:
        """End of the run: the stream, then every graph of the run (see GraphPool)."""
        self._close_stream()
        if self.pool is not None:
            self.pool.close()

    def _refuse_unsafe_modules(self) -> None:
        """A module whose step changes Python state or rebinds tensors would be silently wrong under replay
        (DESIGN §6: TTT updates skipped by the graph): refuse ("on") or run eagerly, naming the modules."""
        bad = unsafe(check_graph_safety(self.model, chunk_size=self.config.chunk_size))
        if not bad:
            return
        names = ", ".join(sorted({f.module or "<model>" for f in bad}))
        if self.config.cuda_graphs == "on":
            raise GraphCaptureError(f"cuda_graphs='on' but these modules are not graph-safe: {names}\n"
                                    f"{format_findings(bad)}")
        self.unsafe = f"not captured: graph-unsafe modules ({names}), running eagerly"
        log.warning("CUDA graphs off: %s\n%s", self.unsafe, format_findings(bad))
        self.pool, self.graph_setting = None, "off"

    def recover(self) -> None:
        """After an out-of-memory error: drop the stream, the graphs and their pool, and return cached memory."""
        self.close()
        gc.collect()
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = GraphPool(device) if self.pool is not None else None  # a fresh pool: see GraphPool
