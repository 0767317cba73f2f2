"""`EvalResult` summaries against hand-computed means."""

from __future__ import annotations

import math

import torch

from fused_stream.core.result import EvalResult, empty_result, fill_rows


def test_mean_losses_ignore_invalid_positions():
    nan = float("nan")
    losses = torch.tensor([[[1.0, 2.0, nan], [4.0, nan, nan]], [[3.0, nan, nan], [nan, nan, nan]]])  # [2, 2, 3]
    text = torch.tensor([[[0.5, nan, nan]], [[1.5, 2.5, nan]]])
    result = EvalResult(losses, ~losses.isnan(), text, ~text.isnan(), torch.tensor([3, 2]))
    means = result.mean_losses()
    assert means["audio_0"] == (1 + 2 + 3) / 3
    assert means["audio_1"] == 4.0
    assert means["audio"] == (1 + 2 + 4 + 3) / 4
    assert means["text"] == (0.5 + 1.5 + 2.5) / 3


def test_mean_of_nothing_is_nan_not_zero():
    result = empty_result(1, 2, 4)
    assert all(math.isnan(v) for v in result.mean_losses().values())


def test_fill_rows_nans_invalid_positions_and_places_rows():
    result = empty_result(3, 1, 4)
    losses = torch.ones(2, 1, 3)
    valid = torch.tensor([[[True, False, True]], [[True, True, False]]])
    text_valid = torch.tensor([[[True, True, True]], [[False, False, False]]])
    fill_rows(result, [2, 0], losses, losses * 2, valid, text_valid, torch.tensor([3, 2]))
    assert result.lengths.tolist() == [2, 0, 3]
    assert result.losses[2, 0, :3].isnan().tolist() == [False, True, False]
    assert result.losses[0, 0, :2].tolist() == [1.0, 1.0] and result.losses[0, 0, 2:].isnan().all()
    assert result.losses[1].isnan().all() and not result.valid[1].any()
    assert result.text_losses[0].isnan().all() and result.text_losses[2, 0, :3].tolist() == [2.0, 2.0, 2.0]
