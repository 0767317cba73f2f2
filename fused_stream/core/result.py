"""`EvalResult`: the one result type every evaluation path returns, always the same shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EvalResult:
    """Per-position teacher-forced losses aligned exactly as `LMModel.forward`.

    `losses[b, k, t]` is the cross-entropy of the logits that predict `codes[b, 1 + k, t]`; `text_losses[b, 0, t]`
    of those that predict `codes[b, 0, t]`. Invalid positions (delay, zero token, padding, masked tokens) hold
    NaN and are False in `valid` / `text_valid` — never a 0.0 that would bias a mean.
    """

    losses: torch.Tensor  # [B, dep_q, T] float32, NaN where invalid
    valid: torch.Tensor  # [B, dep_q, T] bool, identical to LMOutput.mask
    text_losses: torch.Tensor  # [B, 1, T] float32, NaN where invalid
    text_valid: torch.Tensor  # [B, 1, T] bool, identical to LMOutput.text_mask
    lengths: torch.Tensor  # [B] int64, frames of each sequence (T = lengths.max())
    n_masked_tokens: int = 0  # out-of-range tokens masked with invalid_tokens="mask"
    failed: dict[int, str] = field(default_factory=dict)  # row -> why it has no losses (e.g. out of memory at B=1)
    report: dict[str, Any] = field(default_factory=dict)  # path-specific facts: timing, state bytes, ...

    def row(self, i: int) -> EvalResult:
        """Sequence i alone, cropped to its own length (a [1, ..., T_i] result)."""
        T = int(self.lengths[i])
        return EvalResult(
            losses=self.losses[i : i + 1, :, :T], valid=self.valid[i : i + 1, :, :T],
            text_losses=self.text_losses[i : i + 1, :, :T], text_valid=self.text_valid[i : i + 1, :, :T],
            lengths=self.lengths[i : i + 1],
        )

    def mean_losses(self) -> dict[str, float]:
        """Mean loss per audio codebook, over all audio codebooks, and for text; float64, valid positions only."""
        out: dict[str, float] = {}
        audio = self.losses.double()
        for k in range(audio.shape[1]):
            out[f"audio_{k}"] = _nanmean(audio[:, k])
        out["audio"] = _nanmean(audio)
        out["text"] = _nanmean(self.text_losses.double())
        return out


def _nanmean(x: torch.Tensor) -> float:
    n = int((~x.isnan()).sum())
    return float(x.nansum() / n) if n else float("nan")


def empty_result(n: int, dep_q: int, T: int) -> EvalResult:
    """An all-invalid result of the given shape, filled in per batch by the evaluators."""
    return EvalResult(
        losses=torch.full((n, dep_q, T), float("nan")),
        valid=torch.zeros((n, dep_q, T), dtype=torch.bool),
        text_losses=torch.full((n, 1, T), float("nan")),
        text_valid=torch.zeros((n, 1, T), dtype=torch.bool),
        lengths=torch.zeros(n, dtype=torch.long),
    )


def fill_rows(
    result: EvalResult,
    rows: list[int],
    losses: torch.Tensor,
    text_losses: torch.Tensor,
    valid: torch.Tensor,
    text_valid: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Write one batch (rows of the final result, in batch order) into `result`, NaN-ing invalid positions."""
    T = losses.shape[-1]
    nan = torch.tensor(float("nan"))
    for i, row in enumerate(rows):
        result.losses[row, :, :T] = torch.where(valid[i], losses[i].float(), nan)
        result.text_losses[row, :, :T] = torch.where(text_valid[i], text_losses[i].float(), nan)
        result.valid[row, :, :T] = valid[i]
        result.text_valid[row, :, :T] = text_valid[i]
        result.lengths[row] = lengths[i]
