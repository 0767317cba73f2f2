"""`--verify`: the streamed losses of a run against the batch path (`LMModel.forward`) on a prefix that fits.

The batch path holds O(T²) attention, so it only sees the first `frames` frames of each sequence. Streaming is
causal, so on that prefix the run's own losses must equal the batch path's — except in the last `max(delays)`
frames of a cropped prefix, where a delayed codebook's target lies past the crop (the batch path masks it, the
full run scores it). Those frames are left out; a sequence shorter than the prefix is compared whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from moshi.models.lm import LMModel

from .alignment import scored_delays
from .reference import batch_losses
from .result import EvalResult


@dataclass
class ParityReport:
    sequences: int  # sequences compared
    frames: int  # prefix length asked for
    positions: int  # (sequence, stream, position) values compared
    masks_identical: bool
    max_abs_diff: float
    tolerance: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def parity_tolerance(model: LMModel) -> float:
    """Frame/chunk steps round differently from one whole-sequence forward; half precision much more so."""
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype.itemsize >= 4 else 1e-1


def check_parity(
    model: LMModel, sequences: list[torch.Tensor], result: EvalResult, *, frames: int = 256, max_sequences: int = 4
) -> ParityReport:
    """Compare `result` (streamed over `sequences`, each [K, T_i]) with `batch_losses` on their first `frames`."""
    if frames < 1:
        raise ValueError(f"the parity prefix must be >= 1 frame, got {frames}")
    chosen = list(range(min(max_sequences, len(sequences))))
    prefixes = [sequences[i][:, :frames] for i in chosen]
    reference = batch_losses(model, prefixes)
    lead = max(scored_delays(model))
    masks_identical, worst, compared = True, 0.0, 0
    for row, i in enumerate(chosen):
        P, T = prefixes[row].shape[1], sequences[i].shape[1]
        end = P if P == T else max(0, P - lead)  # a cropped prefix: its last `lead` frames differ by construction
        pairs = [
            (result.losses[i, :, :end], result.valid[i, :, :end], reference.losses[row, :, :end],
             reference.valid[row, :, :end]),
            (result.text_losses[i, :, :end], result.text_valid[i, :, :end], reference.text_losses[row, :, :end],
             reference.text_valid[row, :, :end]),
        ]
        for ours, our_mask, theirs, their_mask in pairs:
            same = torch.equal(our_mask, their_mask) and torch.equal(ours.isnan(), theirs.isnan())
            masks_identical &= same
            both = our_mask & their_mask
            compared += int(both.sum())
            if both.any():
                worst = max(worst, float((ours.double() - theirs.double()).abs()[both].max()))
    tolerance = parity_tolerance(model)
    return ParityReport(
        sequences=len(chosen), frames=frames, positions=compared, masks_identical=masks_identical,
        max_abs_diff=worst, tolerance=tolerance, passed=masks_identical and compared > 0 and worst <= tolerance,
    )
