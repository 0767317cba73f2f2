"""The streaming step and the device state it runs on, allocated once per (B, C) shape and reset in place.

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
import math
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.alignment import delayed_sequence, scored_delays
from ..kernels.backends import step_cross_entropy_
from ..kernels.cross_entropy import N_COUNTERS, advance_
from ..patches.attention_step import AttentionStep
from ..patches.depformer import StackedDepformer, prepare_depformer, stacked_bytes, unsupported_reason
from ..patches.patch_probe import PATCHES, Verdict, accept_attention_step, accept_ring_cut, accept_stacked_depformer
from ..patches.ring_attention import RingAttention
from ..patches.streaming import enlarge_rings, held_state_bytes, ring_caches


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
