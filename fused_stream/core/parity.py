"""The streamed losses against the batch path (`LMModel.forward`) on a prefix the batch path can hold.

The batch path holds O(T²) attention, so it only sees the first P frames of a sequence. Streaming is causal, so on
that prefix the streamed losses must equal the batch path's — except in the last `max(delays)` frames of a cropped
prefix, where a delayed codebook's target lies past the crop (the batch path masks it, the full run scores it).
Those frames are left out; a sequence no longer than its prefix is compared whole.

`compare` is the one comparison (masks identical, |streamed - batch| <= `parity_tolerance`, and where they first
differ); `ParityError` is what a failed comparison raises, naming the sequence, stream, frame, both values and a
likely cause. The driver runs it on every run before anything is reported (`core/verification.py`);
`check_parity` runs it after the fact on a finished result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from moshi.models.lm import LMModel

from .alignment import scored_delays
from .reference import batch_losses
from .result import EvalResult

__all__ = ["ParityError", "ParityReport", "check_parity", "compare", "likely_cause", "parity_tolerance",
           "stream_name"]


@dataclass
class ParityReport:
    passed: bool
    sequences: list[int]  # indices (into the evaluated list) of the sequences compared
    frames: list[int]  # prefix of each compared sequence, in frames
    positions: int  # (sequence, stream, position) values compared: valid in both paths
    max_abs_diff: float
    tolerance: float
    masks_identical: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Difference:
    """The first position where the two paths disagree: first in time, then by stream (text, then audio)."""

    sequence: int
    stream: str
    position: int
    streamed: float  # NaN where that path does not score the position
    batch: float
    masks_differ: bool


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


class ParityError(AssertionError):
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


def compare(
    model: LMModel, streamed: EvalResult, reference: EvalResult, sequences: list[int], frames: list[int]
) -> tuple[ParityReport, ParityError | None]:
    """Row r of `streamed` (a full run's losses; `lengths` the sequences' own) against row r of `reference` (the
    batch path on its first `frames[r]` frames); row r is sequence `sequences[r]`. Returns the report and, if
    they differ, the error to raise (at the first sequence that differs)."""
    delays = scored_delays(model)
    lead = max(delays)
    tolerance = parity_tolerance(model)
    masks_identical, worst, compared = True, 0.0, 0
    first: tuple[int, int, int, float, float, bool] | None = None  # (sequence, channel, t, streamed, batch, masks)
    for r, sequence in enumerate(sequences):
        P, T = frames[r], int(streamed.lengths[r])
        end = P if P >= T else max(0, P - lead)  # a cropped prefix: its last `lead` frames differ by construction
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
            t = int(bad.any(dim=0).nonzero()[0])
            channel = int(bad[:, t].nonzero()[0])
            first = (sequence, channel, t, float(ours[channel, t]), float(theirs[channel, t]),
                     bool(masks_differ[channel, t]))
    report = ParityReport(passed=masks_identical and worst <= tolerance, sequences=list(sequences),
                          frames=list(frames), positions=compared, max_abs_diff=worst, tolerance=tolerance,
                          masks_identical=masks_identical)
    if first is None:
        return report, None
    sequence, channel, t, ours_t, theirs_t, masks_differ_t = first
    half = next(model.parameters()).dtype.itemsize < 4
    cause = likely_cause(t + delays[channel], masks_differ=masks_differ_t, max_abs_diff=worst, tolerance=tolerance,
                         context=model.context, half_precision=half)
    return report, ParityError(sequence, stream_name(channel), t, ours_t, theirs_t, tolerance, cause, report)


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


def check_parity(
    model: LMModel, sequences: list[torch.Tensor], result: EvalResult, *, frames: int = 256, max_sequences: int = 4
) -> ParityReport:
    """After the fact: `result` (streamed over `sequences`, each [K, T_i]) against `batch_losses` on the first
    `frames` frames of the first `max_sequences` sequences."""
    if frames < 1:
        raise ValueError(f"the parity prefix must be >= 1 frame, got {frames}")
    chosen = list(range(min(max_sequences, len(sequences))))
    prefixes = [sequences[i][:, :frames] for i in chosen]
    reference = batch_losses(model, prefixes)
    report, _ = compare(model, select_rows(result, chosen), reference, chosen, [p.shape[1] for p in prefixes])
    return report
