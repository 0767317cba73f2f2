"""`--verify`: the streamed losses of a run against the batch path (`LMModel.forward`) on a prefix that fits.

The batch path holds O(T²) attention, so it only sees the first `frames` frames of each sequence. Streaming is
causal, so on that prefix the run's own losses must equal the batch path's — except in the last `max(delays)`
frames of a cropped prefix, where a delayed codebook's target lies past the crop (the batch path masks it, the
full run scores it). Those frames are left out; a sequence shorter than the prefix is compared whole.
"""

from __future__ import annotations

import math
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
