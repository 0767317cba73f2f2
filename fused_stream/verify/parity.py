"""The streamed losses against the batch path (`LMModel.forward`) on a prefix the batch path can hold.

The batch path holds O(T²) attention, so it only sees the first P frames of a sequence. Streaming is causal, so on
that prefix the streamed losses must equal the batch path's — except in the last `max(delays)` frames of a cropped
prefix, where a delayed codebook's target lies past the crop (the batch path masks it, the full run scores it).
Those frames are left out; a sequence no longer than its prefix is compared whole.

`compare` is the one comparison (masks identical, |streamed - batch| <= `parity_tolerance`, and where they first
differ); `ParityError` is what a failed comparison raises, naming the sequence, stream, frame, both values and a
likely cause. The driver runs it on every run before anything is reported (`verify/verification.py`).

Half precision (float16, bfloat16): why the rule cannot fail a correct model on rounding alone. Two half-precision
computations of the same losses (streamed, and `LMModel.forward`) round differently, by errors that depend on the
model, its depth, the data and the position: no formula of the dtype fits them all (the former rule, |streamed -
forward| <= `parity_tolerance`, failed 12 of 160 correct `tiny` runs, e.g. `--dtype float16 --seed 8`). So the
error model is measured on the spot: the same forward on a float32 copy of the weights (`float32_reference`; the
half weights are exact in float32) is what both half paths approximate, and the half forward's distance to it is
this model's rounding error on these very positions. The streamed losses fail only (1) where they are farther
from the float32 forward than `HALF_ERROR_FACTOR` = 4 times the half forward's largest error anywhere in the check
(a rounding error of the streamed path is an error of the same kind and size: the largest ratio of the two paths'
worst errors measured was 1.5), or (2) when, per sequence, they are farther from it than the half forward at
significantly more positions than nearer: z = (farther - nearer) / sqrt(farther + nearer) > `EXCESS_Z` = 5 (two
roundings of the same kind are each the nearer at about half the positions, z ~ N(0, 1): P(z > 5) ~ 3e-7). A
defect moves losses systematically: (1) catches it where it is larger than rounding anywhere, (2) where it is
smaller than rounding at every position but present at many (a leak across batches). What (2) assumes: the
streaming path rounds no worse than the forward (its error's RMS measured at 0.94-1.11x the forward's).

Measured on the project's 2-core CPU VM (OMP_NUM_THREADS=1), the default verification of 4 x 200 generated frames
(`tiny`) and 2 x 100 (`small`), seeds 0-39 (`tiny`) and 100-129 (`small`), frame mode and chunk mode (C = 8);
ratio = max |streamed - float32| / tolerance of a check, z the largest per sequence:

    correct runs               | runs | failed | largest ratio | largest z | former rule failed
    tiny fp16 frame / chunk    | 40/40|   0    |  0.38 / 0.35  | 2.0 / 2.4 |  2 / 9
    tiny bf16 frame / chunk    | 40/40|   0    |  0.33 / 0.32  | 2.9 / 3.1 |  1 / 0
    small fp16 frame / chunk   | 30/30|   0    |  0.32 / 0.33  | 2.7 / 1.6 |  0 / 0
    small bf16 frame / chunk   | 30/30|   0    |  0.39 / 0.25  | 2.1 / 0.0 |  0 / 0

    defects (all caught)                        | smallest ratio      | smallest z
    one-frame misalignment (all settings above) | 14.8 (small bf16)   | 17.7
    state outside moshi's streaming state       | 6.9 (tiny bf16)     | 16.2
    right per frame, wrong across chunks (C=8)  | 3.6 (small bf16)    | 15.3
    state leaking across batches (scale 0.1)    | 0.24 (tiny fp16)    | 6.0 (tiny fp16); 7.3 (bf16)

(`tiny` defects over seeds 0-9, `small` over seeds 0-2: fp16 state outside 85, across chunks 28, leak 137; bf16
7.4, 3.6, 13.8; every z > 15. In bf16 chunk mode `small` streams exactly the half forward's losses: ratio 1/4.)
Margins: a correct run reached 0.39 of the tolerance and z 3.1 (of 5); the smallest defect 3.6x the tolerance, or
z 6.0 (1.2x) for the `tiny` fp16 leak, which no rule over single positions can tell from rounding. If the float32
copy does not fit in memory, the verification falls back to the former rule, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from moshi.models.lm import LMModel

from ..core.alignment import scored_delays
from ..core.result import EvalResult
from ..errors import FusedStreamError

__all__ = ["ParityError", "ParityReport", "compare", "half_precision",
           "likely_cause", "parity_tolerance", "stream_name"]


@dataclass
class ParityReport:
    passed: bool
    sequences: list[int]  # indices (into the evaluated list) of the sequences compared
    frames: list[int]  # prefix of each compared sequence, in frames
    positions: int  # (sequence, stream, position) values compared: valid in both paths
    max_abs_diff: float
    tolerance: float
    masks_identical: bool
    # Half-precision models (see `compare`): what the streamed losses were compared with ("float32 forward", or
    # the model's own dtype), the half-precision forward's own largest error against it, and the excess statistic.
    reference: str = "forward"
    half_error: float | None = None
    excess_z: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# fp32 (and wider): frame/chunk steps and one whole-sequence forward differ by reassociation only (~1e-6 measured);
# a floor that still fails a 1e-3 error.
FP32_FLOOR = 1e-4
# the multiple of eps * sqrt(layers) * ln(vocabulary) allowed: about 4x the worst bf16 difference measured (table).
DEPTH_FACTOR = 0.5


def parity_tolerance(model: LMModel) -> float:
    """Largest |streamed - batch| loss difference accepted: max(floor, 0.5 * eps(dtype) * sqrt(L) * ln(V)).

    Why this shape: a loss is logsumexp(logits) - logit[target], so an error of δ in the logits moves it by
    at most ~2δ. In a low-precision model the logits are rounded activations: each of the L temporal layers adds
    rounding noise of relative size eps (the dtype's machine epsilon: bf16 2^-7, fp16 2^-10) to the residual
    stream, and independent roundings add up like a random walk, ~sqrt(L). The logits' scale is that of the
    loss, which for a model of vocabulary V lives on the scale of ln(V) (the uniform loss; V = the larger of the
    audio and text cards). The factor 0.5 is calibrated on CPU bf16 measurements (below), leaving ~4x headroom for
    the 7B over many more positions. fp32 and wider keep an absolute floor of 1e-4 (reassociation only).

    Measured on this project's 2-core CPU VM: moshi-structured random proxies (`preset_config("small")`, dim 128,
    4 heads, depformer dim 64 x 1 layer, V = 32000), bf16, frame mode (C = 1) vs `batch_losses`, max |diff| over
    audio and text losses; chunk mode (C = 16) matched the batch path exactly (0.0) at every depth:

        layers L | B=2, T=64 | B=4, T=512 | tolerance | losses shifted by one frame (T=64)
        ---------|-----------|------------|-----------|-----------------------------------
               2 |   0.0000  |   0.0203   |   0.057   | max |diff| 3.27
               8 |   0.0274  |   0.0465   |   0.115   | max |diff| 3.09
              16 |   0.0205  |   0.0510   |   0.163   | max |diff| 2.87
              32 |   0.0547  |   0.0593   |   0.229   | max |diff| 2.90

    A misalignment by one frame moves the worst position by ~3 (median ~0.6) even on these near-uniform random
    models, >10x the tolerance; a trained model's losses vary more from frame to frame, so the margin only grows.
    """
    dtype = next(model.parameters()).dtype
    if dtype.itemsize >= 4:
        return FP32_FLOOR
    layers = len(model.transformer.layers)
    vocabulary = max(model.card, model.text_card)
    return DEPTH_FACTOR * torch.finfo(dtype).eps * math.sqrt(layers) * math.log(vocabulary)


def stream_name(channel: int) -> str:
    """A loss channel's name: 0 is the text stream, 1 + k audio codebook k (the driver's order)."""
    return "text" if channel == 0 else f"audio codebook {channel - 1}"


class ParityError(FusedStreamError, AssertionError):
    """The streamed losses differ from the batch path's (`LMModel.forward`) on a verified prefix.

    `sequence` indexes the evaluated list, `stream` names the loss channel ("text", "audio codebook 3"), `position`
    is the frame t of the first difference (first in time, then by stream); `streamed` and `batch` are both values
    there (NaN where that path does not score the position), `cause` the likely cause in words, `report` the
    comparison (`ParityReport`). `str()` is one line; `describe(name)` is the same line naming the sequence.
    """

    def __init__(self, sequence: int, stream: str, position: int, streamed: float, batch: float, tolerance: float,
                 cause: str, report: ParityReport) -> None:
        self.sequence, self.stream, self.position = sequence, stream, position
        self.streamed, self.batch, self.tolerance = float(streamed), float(batch), float(tolerance)
        self.cause, self.report = cause, report
        super().__init__(self.describe(f"sequence {sequence}"))

    def describe(self, name: str) -> str:
        """The one-line message with `name` (e.g. the sequence's file name) in place of "sequence i"."""
        return (f"streaming differs from the batch path (LMModel.forward): {name}, {self.stream}, frame "
                f"{self.position}: streamed {self.streamed:.6g}, batch {self.batch:.6g} (tolerance "
                f"{self.tolerance:.3g}); likely cause: {self.cause}")

    def __reduce__(self) -> tuple:  # picklable (e.g. across processes) despite the keyword-rich constructor
        return (type(self), (self.sequence, self.stream, self.position, self.streamed, self.batch, self.tolerance,
                             self.cause, self.report))


def likely_cause(step: int, *, masks_differ: bool, max_abs_diff: float, tolerance: float,
                 context: int | None = None, half_precision: bool = False) -> str:
    """The likely cause, in words (one line), of a first difference computed at delayed step `step`.

    `step` is the first difference's frame t plus its stream's delay: the model computes the loss of frame t of a
    stream delayed by d at step t + d, so the first `step` steps (frames the model read) agree. A delayed codebook
    shows an error of step 1 at frame 0: judging by t alone would blame the first frame.
    """
    if masks_differ:
        return ("the two paths score different positions: the delays or the alignment of the streamed losses "
                "differ from LMModel.forward's")
    if step == 0:
        cause = "the streaming path computes something else than LMModel.forward from the first frame"
    else:
        cause = (f"the first {step} frames agree, then differ: state carried from step to step differs from "
                 "forward's, typically a layer whose state lives outside moshi's streaming state or that updates "
                 "it only in forward (e.g. a TTT layer updating fast weights in forward only)")
    if context is not None and step >= context:
        cause += (f"; step {step} is past the attention window (context {context}): check what streaming keeps of "
                  "the window (the ring KV cache)")
    if half_precision and max_abs_diff < 10 * tolerance:
        cause += (f"; the largest difference ({max_abs_diff:.3g}) is under 10x the tolerance in a half-precision "
                  "model: it may be precision (rounding), not a bug")
    return cause


# Half precision, checked against a float32 forward (see `compare`): the streamed path may be at most this many times
# farther from the float32 forward than the half-precision forward ever is (measured worst ratio: see the table)...
HALF_ERROR_FACTOR = 4.0
# ...and may not be farther from it at significantly more positions than nearer: the sign statistic z over a
# sequence's positions (about N(0, 1) under rounding alone) above this fails.
EXCESS_Z = 5.0


def half_precision(model: LMModel) -> bool:
    return next(model.parameters()).dtype.itemsize < 4


def compare(
    model: LMModel, streamed: EvalResult, reference: EvalResult, sequences: list[int], frames: list[int],
    exact: EvalResult | None = None,
) -> tuple[ParityReport, ParityError | None]:
    """Row r of `streamed` (a full run's losses; `lengths` the sequences' own) against row r of `reference` (the
    batch path on its first `frames[r]` frames); row r is sequence `sequences[r]`. Returns the report and, if
    they differ, the error to raise (at the first sequence that differs).

    Full precision (or `exact` None): |streamed - reference| <= `parity_tolerance` at every position.

    Half precision with `exact` (the same batch path on a float32 copy: `float32_reference`): rounding, not the
    model, makes both half-precision paths differ from the float32 forward, and by errors of the same size: the
    half forward `reference` is correct by definition, so its distance to `exact` is the rounding error this model
    has on this data. The streamed losses fail only where they are farther from `exact` than
    `HALF_ERROR_FACTOR` times the half forward's largest error anywhere in the check (a localized defect), or when
    they are farther than the half forward at significantly more positions than nearer (a sign statistic z >
    `EXCESS_Z`, per sequence: a defect too small to stand out at any one position, spread over many). Why that
    cannot fire on rounding alone, with the measured margins: this module's docstring.
    """
    if exact is None or not half_precision(model):
        return _compare_full(model, streamed, reference, sequences, frames)
    return _compare_half(model, streamed, reference, exact, sequences, frames)


def _regions(model: LMModel, result: EvalResult, frames: list[int]) -> list[int]:
    """The compared frames of each row: a cropped prefix drops its last `lead` frames (they differ by construction)."""
    lead = max(scored_delays(model))
    return [P if P >= int(result.lengths[r]) else max(0, P - lead) for r, P in enumerate(frames)]


def _compare_full(
    model: LMModel, streamed: EvalResult, reference: EvalResult, sequences: list[int], frames: list[int]
) -> tuple[ParityReport, ParityError | None]:
    tolerance = parity_tolerance(model)
    masks_identical, worst, compared = True, 0.0, 0
    first: tuple[int, int, int, float, float, bool] | None = None  # (sequence, channel, t, streamed, batch, masks)
    for r, (sequence, end) in enumerate(zip(sequences, _regions(model, streamed, frames), strict=True)):
        ours, our_mask = _channels(streamed, r, end)  # [1 + dep_q, end], text first
        theirs, their_mask = _channels(reference, r, end)
        masks_differ = (our_mask != their_mask) | (ours.isnan() != theirs.isnan())
        both = our_mask & their_mask
        diff = (ours.double() - theirs.double()).abs()
        compared += int(both.sum())
        if both.any():
            worst = nan_max(worst, float(diff[both].max()))  # a NaN loss in a valid position fails
        masks_identical &= not bool(masks_differ.any())
        bad = masks_differ | (both & ~(diff <= tolerance))
        if first is None and bool(bad.any()):
            first = _first(sequence, bad, ours, theirs, masks_differ)
    report = ParityReport(passed=masks_identical and worst <= tolerance, sequences=list(sequences),
                          frames=list(frames), positions=compared, max_abs_diff=worst, tolerance=tolerance,
                          masks_identical=masks_identical)
    return report, _error(model, first, worst, tolerance, report)


def _compare_half(
    model: LMModel, streamed: EvalResult, reference: EvalResult, exact: EvalResult, sequences: list[int],
    frames: list[int],
) -> tuple[ParityReport, ParityError | None]:
    rows = []
    for r, end in enumerate(_regions(model, streamed, frames)):
        ours, our_mask = _channels(streamed, r, end)
        half, half_mask = _channels(reference, r, end)
        truth, _ = _channels(exact, r, end)
        masks_differ = (our_mask != half_mask) | (ours.isnan() != half.isnan())
        both = our_mask & half_mask
        rows.append((ours, half, truth, masks_differ, both))
    # One tolerance per check: the half forward's worst rounding error over all its compared positions, times the
    # factor; never below the rounding of the loss itself (one eps of its magnitude) nor the float32 floor.
    half_error, magnitude, compared = 0.0, 0.0, 0
    for _, half, truth, _, both in rows:
        if both.any():
            half_error = nan_max(half_error, float((half.double() - truth.double()).abs()[both].max()))
            magnitude = nan_max(magnitude, float(truth[both].abs().max()))
            compared += int(both.sum())
    eps = torch.finfo(next(model.parameters()).dtype).eps
    tolerance = max(HALF_ERROR_FACTOR * half_error, eps * magnitude, FP32_FLOOR)
    masks_identical, worst, excess = True, 0.0, -math.inf
    first: tuple[int, int, int, float, float, bool] | None = None
    for sequence, (ours, half, truth, masks_differ, both) in zip(sequences, rows, strict=True):
        ours_error = (ours.double() - truth.double()).abs()
        half_row_error = (half.double() - truth.double()).abs()
        masks_identical &= not bool(masks_differ.any())
        z = 0.0
        if both.any():
            worst = nan_max(worst, float(ours_error[both].max()))
            farther = int((ours_error > half_row_error)[both].sum())
            nearer = int((ours_error < half_row_error)[both].sum())
            z = (farther - nearer) / math.sqrt(farther + nearer) if farther + nearer else 0.0
            excess = max(excess, z)
        bad = masks_differ | (both & ~(ours_error <= tolerance))
        if not bad.any() and z > EXCESS_Z:  # systematic: name the first position farther than the forward ever is
            bad = both & (ours_error > half_error)
            if not bad.any():
                bad = both & (ours_error - half_row_error == (ours_error - half_row_error)[both].max())
        if first is None and bool(bad.any()):
            first = _first(sequence, bad, ours, truth, masks_differ)
    passed = first is None and masks_identical
    report = ParityReport(passed=passed, sequences=list(sequences), frames=list(frames), positions=compared,
                          max_abs_diff=worst, tolerance=tolerance, masks_identical=masks_identical,
                          reference="float32 forward", half_error=half_error,
                          excess_z=excess if excess > -math.inf else 0.0)
    return report, _error(model, first, worst, tolerance, report)


def _first(sequence: int, bad: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor,
           masks_differ: torch.Tensor) -> tuple[int, int, int, float, float, bool]:
    """(sequence, channel, t, streamed, reference, masks differ) at the first bad position: first in time, then by
    stream."""
    t = int(bad.any(dim=0).nonzero()[0])
    channel = int(bad[:, t].nonzero()[0])
    return sequence, channel, t, float(ours[channel, t]), float(theirs[channel, t]), bool(masks_differ[channel, t])


def _error(model: LMModel, first: tuple[int, int, int, float, float, bool] | None, worst: float, tolerance: float,
           report: ParityReport) -> ParityError | None:
    if first is None:
        return None
    sequence, channel, t, ours_t, theirs_t, masks_differ_t = first
    cause = likely_cause(t + scored_delays(model)[channel], masks_differ=masks_differ_t, max_abs_diff=worst,
                         tolerance=tolerance, context=model.context,
                         half_precision=half_precision(model) and report.half_error is None)
    return ParityError(sequence, stream_name(channel), t, ours_t, theirs_t, tolerance, cause, report)


def nan_max(a: float, b: float) -> float:
    """max() that keeps a NaN (Python's max(0.0, nan) is 0.0)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _channels(result: EvalResult, row: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, valid) of one row, [1 + dep_q, end], text first: the loss channels in the driver's order."""
    losses = torch.cat([result.text_losses[row, :, :end], result.losses[row, :, :end]])
    valid = torch.cat([result.text_valid[row, :, :end], result.valid[row, :, :end]])
    return losses, valid


def select_rows(result: EvalResult, rows: list[int]) -> EvalResult:
    """The rows `rows` of `result`, in that order, at full width."""
    index = torch.tensor(rows, dtype=torch.long)
    return EvalResult(losses=result.losses[index], valid=result.valid[index], text_losses=result.text_losses[index],
                      text_valid=result.text_valid[index], lengths=result.lengths[index])
