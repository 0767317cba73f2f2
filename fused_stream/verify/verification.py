"""Verification on by default: every run first checks a prefix of its data against the batch path.

A layer whose state lives outside moshi's streaming state, or whose streaming path differs from its `forward` (a
hand-written TTT layer that updates its fast weights only in `forward`), streams numbers that look fine and are
wrong. So before anything is reported, the driver compares the run's *own* streamed losses (no extra streaming) on
a short prefix of up to two sequences with `LMModel.forward` over that prefix (`verify/reference.py:batch_losses`):

1. `Verification(...)`, after preflight fixed the batches and before any `Stream` opens (moshi modules inside
   `streaming()` cannot run a plain forward): pick the prefixes (`verification_prefix`) of up to two sequences
   (`candidates`: the first of the first batch, and the first of the second batch — streamed after a `reset()` of
   the same stream, so a state that leaks from one batch into the next is caught — or, with one batch, its second
   row) and compute their batch-path reference;
2. `pause_after(rows)`: while the batch holding them streams, the driver pauses after the first k calls, exactly
   enough to have written every loss of the compared prefix;
3. `check(...)`: one host copy of that prefix of the stream's loss buffer, compared (`parity.compare`); a mismatch
   raises `ParityError` before the batch finishes, so nothing of it is reported.

Pending checks are keyed by sequence index: after an out-of-memory retry at a smaller batch size the verified
sequences may land in different batches, and each is checked in whichever batch streams it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.alignment import scored_delays, valid_masks
from ..core.restore import ModelRestorer
from ..core.result import empty_result, fill_rows
from ..patches.foreign import ForeignLayer, foreign_layers
from .parity import ParityReport, compare, half_precision, nan_max, select_rows
from .reference import batch_losses, float32_reference

__all__ = ["Verification", "candidates", "verification_prefix"]

log = logging.getLogger(__name__)

MAX_SEQUENCES = 2  # sequences verified per run
FULL_PREFIX = 256  # frames per sequence when the budget allows
BUDGET_SHARE = 25  # the batch forward may cost 1/25 of the run's frames...
MIN_BUDGET = 80  # ...but never less than this many frames
CROSSING_MARGIN = 8  # compared frames past the first call: a state not carried across calls is caught
UPDATES_REACHED = 2  # a foreign layer's state updates the prefix must pass (the first, and one more period)
FOREIGN_MIN_FRAMES = 512  # frames verified of a foreign stateful layer that does not say when it updates
FOREIGN_MIN_CALLS = 3  # calls such a prefix crosses at least


def required_reach(layers: list[ForeignLayer], frames_per_call: int, lead: int) -> int:
    """Frames a verified prefix must hold so that it passes the state updates of every foreign stateful layer
    (`patches.foreign`): `UPDATES_REACHED` update periods of the slowest layer that says its period; for a layer that
    does not (this package's own aside), at least `FOREIGN_MIN_FRAMES` frames and `FOREIGN_MIN_CALLS` calls; plus
    the lead the prefix crops and a margin. 0 without foreign stateful layers (moshi's state is all in its streaming
    state)."""
    if not layers:
        return 0
    periods = [layer.period for layer in layers if layer.period is not None]
    reach = UPDATES_REACHED * max(periods) if periods else 0
    if any(layer.period is None and not layer.ours for layer in layers):
        reach = max(reach, FOREIGN_MIN_FRAMES, FOREIGN_MIN_CALLS * frames_per_call)
    return reach + lead + CROSSING_MARGIN


def verification_prefix(
    lengths: list[int], run_frames: int, frames_per_call: int, lead: int, verify_frames: int | None = None,
    reach: int = 0,
) -> list[int]:
    """Frames verified of each candidate sequence (`lengths`: the first up to 2 of the first batch); one entry per
    verified sequence, so a shorter list verifies fewer sequences.

    Explicit `verify_frames`: exactly min(verify_frames, T_i) for each of up to 2 sequences, no budget (at least
    lead + 1, so that a cropped prefix still compares a frame).

    Automatic (None): the cost is the batch forward over the prefixes, which on a CPU costs about as much per frame
    as chunk-mode streaming (measured, `small` preset, fp32: chunk C=64 streams 2000 frames in 1.25 s, 0.6 ms a
    frame; `batch_losses` on [2, K, 256] 0.234 s, [2, K, 64] 0.048 s, [2, K, 32] 0.030 s: 0.4-0.5 ms a frame;
    frame mode streams only ~100 frames/s, so it is far cheaper there). `reach` > 0 (a foreign stateful layer,
    `required_reach`) is not budgeted: each sequence gets min(T_i, max(reach, the automatic prefix)), since a prefix
    that ends before the layer's first state update proves nothing about it. To keep it under 5% of a run of >= 2000
    frames, the prefixes get a budget of max(run_frames // 25, 80) frames in total (4% of the run's frames, and
    80 frames even for short runs: a 2000-frame C=64 run spends ~0.04 s of its 1.25 s):

    - each sequence wants min(T_i, max(256, frames_per_call + lead + 8)) frames: 256, and with a large chunk
      enough that the compared region (a cropped prefix drops its last `lead` frames) runs 8 frames into the
      second call, where a state not carried from one step/chunk to the next shows; up to 2 sequences (a long
      run: 2 x 256, ~0.23 s);
    - over the budget, each shrinks to budget // n, but not below min(T_i, frames_per_call + lead + 8);
    - if that still exceeds the budget, 1 sequence of min(want, budget) frames is verified: with a chunk larger
      than the budget (chunk_size="auto" on a short run) that prefix stays inside the first call, and says so
      by its length (< frames_per_call).

    E.g. 2 x 1000 frames, C=64, lead 1: budget 80; 2 x 40 < the minimum 73, and 2 x 73 > 80 -> one prefix of 80
    frames, 16 into the second call. The same run in frame mode -> 2 x 40.
    """
    candidates = lengths[:MAX_SEQUENCES]
    if verify_frames is not None:  # at least lead + 1 frames: a cropped prefix drops its last `lead`
        return [min(max(verify_frames, lead + 1), T) for T in candidates]
    if reach > 0:
        return [min(T, max(reach, FULL_PREFIX, frames_per_call + lead + CROSSING_MARGIN)) for T in candidates]
    budget = max(run_frames // BUDGET_SHARE, MIN_BUDGET)
    crossing = frames_per_call + lead + CROSSING_MARGIN
    want = [min(T, max(FULL_PREFIX, crossing)) for T in candidates]
    if sum(want) <= budget:
        return want
    floors = [min(T, crossing) for T in candidates]
    shrunk = [max(min(P, budget // len(candidates)), floor) for P, floor in zip(want, floors, strict=True)]
    if sum(shrunk) <= budget:
        return shrunk
    return [min(want[0], budget)]


def candidates(batches: list[list[int]]) -> list[int]:
    """The sequences verified (up to `MAX_SEQUENCES`): the first of the first batch, then the first of the second
    batch (it streams after the stream's `reset()`: a state that leaks across batches shows there), else the first
    batch's second row."""
    first = batches[0][:1]
    return first + (batches[1][:1] if len(batches) > 1 else batches[0][1:MAX_SEQUENCES])


class Verification:
    """The run's check against the batch path: the prefixes, their reference, and the comparison mid-batch."""

    def __init__(
        self, model: LMModel, sequences: list[torch.Tensor], batches: list[list[int]], frames_per_call: int,
        verify_frames: int | None = None,
    ) -> None:
        self.model = model
        lengths = [s.shape[1] for s in sequences]
        chosen = candidates(batches)
        lead = max(scored_delays(model))
        self.foreign = foreign_layers(model)
        self.reach = required_reach(self.foreign, frames_per_call, lead)
        frames = verification_prefix([lengths[i] for i in chosen], sum(lengths), frames_per_call, lead, verify_frames,
                                     self.reach)
        # sequence index -> prefix frames, until checked; `frames` may verify fewer sequences than `chosen`
        self.pending: dict[int, int] = dict(zip(chosen, frames, strict=False))
        self.order = list(self.pending)  # the reference's rows
        # Whether the compared region reaches a second call (a cropped prefix drops its last `lead` frames): a layer
        # wrong only across calls (chunks) is caught only then. With a chunk larger than a short run's budget it is
        # not; the report says so, and so does the log.
        self.crosses_calls = any(P - (0 if P >= lengths[i] else lead) > frames_per_call
                                 for i, P in self.pending.items())
        if not self.crosses_calls and any(lengths[i] > frames_per_call for i in self.pending):
            log.warning("the verified prefix (%s frames) stays inside the first call of %d frames: a layer that "
                        "streams wrong only across calls would not be seen; --verify-frames %d (verify_frames=) "
                        "reaches the second call", "+".join(map(str, frames)), frames_per_call,
                        frames_per_call + lead + CROSSING_MARGIN)
        self.reaches_updates = all(P >= min(self.reach, lengths[i]) for i, P in self.pending.items())
        if not self.reaches_updates:
            log.warning("the verified prefix (%s frames) ends before the state updates of %s (%d frames needed): "
                        "a layer that goes wrong after its first update would not be seen", "+".join(map(str, frames)),
                        ", ".join(layer.name for layer in self.foreign), self.reach)
        start = time.perf_counter()
        prefixes = [sequences[i][:, :P] for i, P in self.pending.items()]
        # Equal prefixes: one [n, K, P] forward, unless the run streams one sequence at a time (a layer may support
        # nothing else); otherwise one forward per sequence (no padding to reason about).
        stacked = len({p.shape[1] for p in prefixes}) == 1 and len(prefixes) <= max(len(rows) for rows in batches)
        codes = torch.stack(prefixes) if stacked else prefixes
        # The references start from the state the model came in with, and so does the run after them: a foreign
        # layer that adapts in its forward would otherwise hand its adapted weights to the streamed run.
        restorer = ModelRestorer(model)
        try:
            self.reference = batch_losses(model, codes)
            # Half precision: the same forward in float32 too, so that rounding is told from a defect
            # (`parity.compare`).
            self.exact = None
            if half_precision(model):
                restorer.restore()
                try:
                    self.exact = float32_reference(model, codes)
                except (torch.cuda.OutOfMemoryError, MemoryError):
                    log.warning("the float32 copy of the model for verification does not fit: the streamed losses "
                                "are compared with the %s forward alone, where rounding may show as a difference",
                                next(model.parameters()).dtype)
        finally:
            restorer.restore()
        self.reference_seconds = time.perf_counter() - start
        self.compare_seconds = 0.0
        self.reports: list[ParityReport] = []

    def pause_after(self, rows: list[int], frames_per_call: int) -> int | None:
        """Calls after which the batch of `rows` holds every loss of its pending prefixes (None: none pending).

        A loss at original time t of a stream of delay d is written by delayed step t + d, and it is valid only when
        t + d < T_i. The compared region is [0, P) when P = T_i (every valid step is < T_i = P) and [0, P - lead)
        otherwise (steps < P - lead + lead = P): either way, delayed steps [0, P) suffice, i.e. the first
        ceil(P / frames_per_call) calls (never more than the batch's, since P <= T_i <= the batch's length).
        """
        prefixes = [self.pending[i] for i in rows if i in self.pending]
        return max(math.ceil(P / frames_per_call) for P in prefixes) if prefixes else None

    def check(self, stream: Any,  # an engine.stream.Stream (the engine calls this; no import upward)
               rows: list[int], batch: torch.Tensor, lengths: torch.Tensor) -> None:
        """Compare the pending prefixes of `rows` (streamed into `stream` from the host `batch` [B, K, T] of
        `lengths`) with the reference; raise ParityError on a mismatch."""
        start = time.perf_counter()
        positions = [j for j, i in enumerate(rows) if i in self.pending]
        sequences = [rows[j] for j in positions]
        frames = [self.pending[i] for i in sequences]
        width = max(frames)
        index = torch.tensor(positions, dtype=torch.long)
        # The one host copy inside a batch, once per run: it waits for the calls queued so far (on a GPU the rest of
        # the batch is not queued yet, so the device idles for the copy's few milliseconds). Losses are stored at
        # time t + lead; channel 0 is text.
        host = stream.losses.index_select(0, index.to(stream.losses.device))[:, :, stream.lead : stream.lead + width]
        host = host.cpu()
        codes, own_lengths = batch[index, :, :width], lengths[index]
        valid, text_valid = valid_masks(self.model, codes, own_lengths)  # the full sequence's masks, cropped
        streamed = empty_result(len(positions), self.model.dep_q, width)
        fill_rows(streamed, list(range(len(positions))), host[:, 1:], host[:, :1], valid, text_valid, own_lengths)
        rows_of_reference = [self.order.index(i) for i in sequences]
        reference = select_rows(self.reference, rows_of_reference)
        exact = None if self.exact is None else select_rows(self.exact, rows_of_reference)
        report, error = compare(self.model, streamed, reference, sequences, frames, exact=exact)
        self.reports.append(report)
        for i in sequences:
            del self.pending[i]
        self.compare_seconds += time.perf_counter() - start
        if error is not None:
            error.report = merge(self.reports)
            raise error
        log.info("verified against LMModel.forward: sequences %s, first %s frames, max |diff| %.2e (tolerance %.1e)",
                 sequences, frames, report.max_abs_diff, report.tolerance)

    def report(self, run_seconds: float) -> dict:
        """`result.report["verification"]`: what was compared, how closely, and what it cost."""
        if not self.reports:  # every verified sequence failed before its check (out of memory at batch size 1)
            return {"skipped": "no verified sequence was streamed (see failed)"}
        seconds = self.reference_seconds + self.compare_seconds
        return merge(self.reports).as_dict() | {
            "crosses_calls": self.crosses_calls,
            # foreign stateful layers (patches.foreign), the frames the prefix had to reach, and whether it did
            "foreign_layers": [{"name": layer.name, "type": type(layer.module).__name__, "update_period": layer.period}
                               for layer in self.foreign],
            "required_frames": self.reach,
            "reaches_updates": self.reaches_updates,
            "reference_seconds": self.reference_seconds,
            "seconds": seconds,
            "fraction_of_run": seconds / run_seconds if run_seconds > 0 else float("nan"),
        }


def merge(reports: list[ParityReport]) -> ParityReport:
    """One report over the checks of a run (one per batch that held verified sequences). Half-precision checks each
    have their own tolerance: the difference and tolerance shown are the check's closest to failing."""
    closest = max(reports, key=lambda r: math.inf if math.isnan(r.max_abs_diff) else r.max_abs_diff / r.tolerance)
    half_errors = [r.half_error for r in reports if r.half_error is not None]
    excess = [r.excess_z for r in reports if r.excess_z is not None]
    return ParityReport(
        passed=all(r.passed for r in reports), sequences=[i for r in reports for i in r.sequences],
        frames=[f for r in reports for f in r.frames], positions=sum(r.positions for r in reports),
        max_abs_diff=functools.reduce(nan_max, (r.max_abs_diff for r in reports)) if closest.half_error is None
        else closest.max_abs_diff, tolerance=closest.tolerance,
        masks_identical=all(r.masks_identical for r in reports), reference=closest.reference,
        half_error=functools.reduce(nan_max, half_errors) if half_errors else None,
        excess_z=max(excess) if excess else None,
    )
