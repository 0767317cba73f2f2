"""Independent reference for the tests: losses straight from `LMModel.forward` logits, CE in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile


def forward_losses(model: LMModel, codes: torch.Tensor):
    """(audio [B, dep_q, T], text [B, 1, T] float64 losses with NaN where masked, mask, text_mask) of one forward."""
    with torch.no_grad(), no_compile():
        out = model(codes)
    audio = _ce64(out.logits, codes[:, 1 : 1 + model.dep_q], out.mask)
    text = _ce64(out.text_logits, codes[:, :1], out.text_mask)
    return audio, text, out.mask, out.text_mask


def _ce64(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, K, T, V = logits.shape
    x = logits.double().nan_to_num(0.0).reshape(-1, V)
    ce = F.cross_entropy(x, targets.clamp(0, V - 1).reshape(-1), reduction="none").view(B, K, T)
    return torch.where(mask, ce, torch.full_like(ce, float("nan")))


def assert_losses_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    """Same NaN pattern, and max |actual - expected| <= atol elsewhere; names the worst position on failure."""
    actual, expected = actual.double(), expected.double()
    nan_a, nan_e = actual.isnan(), expected.isnan()
    if not torch.equal(nan_a, nan_e):
        where = (nan_a != nan_e).nonzero()[0].tolist()
        a, e = actual[tuple(where)], expected[tuple(where)]
        raise AssertionError(f"NaN pattern differs first at {where}: {a} vs {e}")
    diff = (actual - expected).abs().nan_to_num(0.0)
    if diff.max() > atol:
        where = (diff == diff.max()).nonzero()[0].tolist()
        raise AssertionError(
            f"max abs diff {float(diff.max()):.3e} > {atol} at {where}: "
            f"{actual[tuple(where)]} vs {expected[tuple(where)]}"
        )
