"""The per-step torch cross-entropy against `F.cross_entropy` in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_stream.step_loss import rowwise_cross_entropy


@pytest.mark.parametrize("vocab", [64, 2048, 1000])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_float64_reference(vocab, dtype, rtol):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(3, 5, 7, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (3, 5, 7), generator=g)
    expected = F.cross_entropy(logits.double().reshape(-1, vocab), targets.reshape(-1), reduction="none").view(3, 5, 7)
    actual = rowwise_cross_entropy(logits, targets)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-6)


def test_targets_outside_vocab_give_nan():
    logits = torch.zeros(4, 10)
    targets = torch.tensor([-1, 10, 3, 11])
    loss = rowwise_cross_entropy(logits, targets)
    assert loss.isnan().tolist() == [True, True, False, True]
    assert loss[2].item() == pytest.approx(torch.log(torch.tensor(10.0)).item())


def test_non_contiguous_rows():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 2, 50, generator=g)
    logits = base[:, 1]  # strided rows
    targets = torch.randint(0, 50, (6,), generator=g)
    expected = F.cross_entropy(logits.double(), targets, reduction="none").float()
    torch.testing.assert_close(rowwise_cross_entropy(logits, targets), expected)
