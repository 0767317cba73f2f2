"""The streaming step and the device state it runs on, allocated once per (B, C) shape and reset in place; and
`RunStreams`, the run's current Stream and its captured steps, reopened when the batch shape changes.

The step: the whole delayed sequence D [B, K, L + 1] sits on the device; at step s it gathers
D[:, :, s : s + C + 1] with the device counter `pos`, runs `forward_text` (streaming, ring KV cache) on the first
C columns and `forward_depformer_training` (non-streaming over the K codebooks; `patches.depformer` computes it with
stacked per-codebook weights) on the last C, and one launch of
`kernels.cross_entropy` scores every row and writes it into a preallocated loss buffer at original time
t = s + j - delay_k; `pos` then advances on the device.

Every tensor the step touches is allocated when the `Stream` opens, before any CUDA graph is captured, and keeps
its address for the Stream's life: a new batch of the same shape is *copied into* these buffers and the streaming
state is reset in place (moshi's `reset_streaming`), so a captured graph replays on it unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.alignment import delayed_sequence, scored_delays
from ..core.config import Plan
from ..kernels.backends import step_cross_entropy_
from ..kernels.cross_entropy import N_COUNTERS, advance_
from ..patches.attention_step import AttentionStep
from ..patches.depformer import StackedDepformer, prepare_depformer, stacked_bytes, unsupported_reason
from ..patches.patch_probe import PATCHES, Verdict, accept_attention_step, accept_ring_cut, accept_stacked_depformer
from ..patches.ring_attention import RingAttention
from ..patches.state_snapshot import format_findings, unsafe
from ..patches.streaming import enlarge_rings, held_state_bytes, ring_caches
from .graphs import GraphCaptureError, GraphPool, verify_replay
from .graphsafe import check_stream
from .steps import RingSteps

log = logging.getLogger(__name__)

class Stream:
    """The model in streaming mode for B sequences, chunk C, unroll U, and every tensor its step touches.

    `capacity` (frames) bounds the longest batch it can hold; `load()` copies a batch in and resets everything in
    place; `step()` is the unit a CUDA graph captures (U steps of C frames); `close()` leaves streaming mode.
    `patches`: the patches of moshi's code it may install (`patch_probe.PATCHES`, each installed only if its probe
    reproduces moshi on this instance); `self.patches` says, per patch, whether it was installed and why not.
    """

    def __init__(
        self, model: LMModel, batch_size: int, chunk: int, capacity: int, backend: str, unroll: int = 1,
        patches: frozenset[str] = PATCHES,
    ) -> None:
        self.model, self.batch_size, self.chunk, self.unroll, self.backend = model, batch_size, chunk, unroll, backend
        self.frames_per_call = chunk * unroll  # frames of one sequence covered by one `step()` call
        self.capacity = _round_up(capacity, self.frames_per_call)
        self.n_calls = 0  # `step()` calls the loaded batch needs
        device = next(model.parameters()).device
        self.lead = max(scored_delays(model))
        # The loss buffer is indexed by original time shifted right by `lead`, so the (discarded) rows of negative
        # times at the start land in the lead columns; its last column is the kernel's trash column.
        self.losses = torch.full((batch_size, 1 + model.dep_q, self.lead + self.capacity + 1), float("nan"),
                                 device=device)  # [B, 1 + dep_q, lead + capacity + 1] float32: text, then audio
        self.delayed = torch.full((batch_size, model.num_codebooks, self.capacity + 1), -1, dtype=torch.long,
                                  device=device)  # [B, K, capacity + 1] the whole delayed batch
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.counts = torch.zeros(N_COUNTERS, dtype=torch.long, device=device)  # see kernels.cross_entropy
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # delayed step s, advanced on the device
        self.window = torch.arange(chunk + 1, device=device)  # [C + 1]
        self.delays = torch.tensor(scored_delays(model), device=device)  # [1 + dep_q], one per loss channel
        # moshi's forward_depformer_training with its per-codebook weights stacked (one bmm per projection instead
        # of dep_q linears), or moshi's own for configurations it does not reproduce: decided once, here, before
        # any capture, since the stacked weights must keep their addresses (patches/depformer.py).
        self.depformer = prepare_depformer(model, frames=batch_size * chunk,  # B * C: see MAX_ATTENTION_BATCH
                                           stack="stacked_depformer" in patches)
        self.patches: dict[str, dict[str, Any]] = {}  # per patch: installed, reason, probe_seconds, cached
        if isinstance(self.depformer, StackedDepformer):
            verdict = accept_stacked_depformer(model, self.depformer, chunk)
            if not verdict.accepted:
                self.depformer = prepare_depformer(model, frames=batch_size * chunk, stack=False)
        else:
            verdict = _not_installed("stacked_depformer", patches,
                                     unsupported_reason(model) or "gradients enabled: moshi's function is kept")
        self._record(verdict)
        # Calls past the loaded batch (the warm-up before a CUDA graph capture runs three, whatever the batch's
        # length) must not gather past the buffer: on CUDA that is a device-side assert that kills the process.
        # Clamped columns read the fill; every loss they produce falls past each length and is masked.
        self.last_column = self.capacity
        # Ring slots `step()` attends over (None: the whole ring, moshi's path): set around each call by the driver's
        # `steps.RingSteps` from `calls_done`, the host count of calls since `reset()` (ring_attention.py).
        self.attend_frames: int | None = None
        self.calls_done = 0
        self._exit = contextlib.ExitStack()
        try:
            self._exit.enter_context(model.streaming(batch_size))
            if chunk > 1:
                enlarge_rings(model, context_extra=chunk - 1)
            attention = RingAttention(model)
            cut = (accept_ring_cut(attention.modules, chunk) if "ring_cut" in patches
                   else _not_installed("ring_cut", patches, ""))
            attention.cutting = cut.accepted
            self._record(cut)
            self.attention = self._exit.enter_context(attention)  # left (after AttentionStep) first on close()
            # The step's geometry (RoPE angles, ring indices, mask) built once for all its layers (attention_step.py).
            step = (accept_attention_step(attention.modules, chunk, cut=cut.accepted) if "attention_step" in patches
                    else _not_installed("attention_step", patches, ""))
            if step.accepted and not self._exit.enter_context(AttentionStep(attention)).installed:
                step = Verdict("attention_step", False, "temporal attention layers differ in ring, RoPE or heads")
            self._record(step)
        except BaseException:
            # The ring caches are the largest allocations: an out-of-memory error here must leave the model as it
            # was (out of streaming mode, no cache referenced) so the caller can free memory and retry smaller.
            self._exit.close()
            model._stop_streaming()  # moshi leaves the modules opened before a failure in streaming mode
            raise

    def _record(self, verdict: Verdict) -> None:
        self.patches[verdict.patch] = verdict.as_dict()

    def fits(self, batch_size: int, frames: int) -> bool:
        return batch_size == self.batch_size and frames <= self.capacity

    def load(self, codes: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copy a padded batch codes [B, K, T] of `lengths` in and reset the state to that of a fresh stream."""
        B, _, T = codes.shape
        if not self.fits(B, T):
            raise ValueError(f"batch [B={B}, T={T}] does not fit a stream of B={self.batch_size}, "
                             f"capacity {self.capacity}")
        self.n_calls = math.ceil(T / self.frames_per_call)
        frames = self.n_calls * self.frames_per_call
        # The padded tail reads zero tokens; its outputs fall past each length and are masked by the kernel.
        delayed = delayed_sequence(self.model, codes, length=frames + 1)
        self.delayed[:, :, : frames + 1].copy_(delayed, non_blocking=True)
        self.lengths.copy_(lengths, non_blocking=True)
        self.reset()

    def reset(self) -> None:
        """Back to the start of the loaded batch: streaming state, counter, losses, counters; all in place."""
        self.model.reset_streaming()
        for cache in ring_caches(self.model):
            # moshi's reset rewinds the ring's offsets, and its masks hide the old entries; zeroing them too makes
            # a reset stream bit-identical to a fresh one even if a previous batch left NaN or inf behind.
            cache.cache.zero_()
        self.pos.zero_()
        self.losses.fill_(float("nan"))
        self.counts.zero_()
        self.calls_done = 0

    def step(self) -> None:
        """`unroll` consecutive steps: the unit a CUDA graph captures (one per `attend_frames` value)."""
        for u in range(self.unroll):  # `attend_frames` counts the keys after the last step: C fewer per step before
            frames = None if self.attend_frames is None else self.attend_frames - (self.unroll - 1 - u) * self.chunk
            with self.attention.attending(frames):
                self.step_once()

    def step_once(self) -> None:
        """One step of C frames; its inputs are gathered by the device counter and its losses written on the device."""
        model, C = self.model, self.chunk
        cols = self.delayed.index_select(2, (self.pos + self.window).clamp_(max=self.last_column))  # [B, K, C + 1]
        transformer_out, text_logits = model.forward_text(cols[:, :, :C])  # [B, C, D], [B, 1, C, text_card]
        logits = self.depformer(cols[:, :, 1:], transformer_out)  # [B, dep_q, C, card]
        targets = cols[:, : 1 + model.dep_q, 1:]  # [B, 1 + dep_q, C]: step s predicts the next delayed column
        step_cross_entropy_(
            text_logits, logits, targets, self.delays, self.lengths, self.pos, self.losses, self.counts,
            self.lead, self.backend,
        )
        advance_(self.pos, C)

    def host_losses(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's copy to host after its last step: audio [B, dep_q, T], text [B, 1, T], counters [3]."""
        host = self.losses[:, :, self.lead : self.lead + T].cpu()
        return host[:, 1:], host[:, :1], self.counts.cpu()

    def state_bytes(self) -> int:
        """Bytes of the streaming state (KV caches, offsets) plus the step's working tensors."""
        small = (self.pos, self.window, self.delays, self.lengths, self.counts)
        return (held_state_bytes(self.model) + sum(t.untyped_storage().nbytes() for t in small)
                + stacked_bytes(self.depformer))

    def close(self) -> None:
        self._exit.close()


def _not_installed(patch: str, allowed: frozenset[str], reason: str) -> Verdict:
    return Verdict(patch, False, reason if patch in allowed else "turned off by the caller (Stream(patches=...))")


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


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
