"""The reference paths: `batch_losses` against float64 CE of `LMModel.forward`, the naive loop against both."""

from __future__ import annotations

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses

from fused_stream.verify.reference import batch_losses, naive_streaming_losses


def test_batch_losses_equal_float64_cross_entropy_of_forward(tiny_model, make_codes):
    codes = torch.cat([make_codes(tiny_model, 40, seed=s) for s in range(2)])
    codes[1, 4, 9] = tiny_model.zero_token_id
    audio, text, mask, text_mask = forward_losses(tiny_model, codes)
    result = batch_losses(tiny_model, codes)
    assert torch.equal(result.valid, mask) and torch.equal(result.text_valid, text_mask)
    assert_losses_close(result.losses, audio, atol=1e-5)
    assert_losses_close(result.text_losses, text, atol=1e-5)
    assert result.report["path"] == "batch"


@pytest.mark.parametrize("frames", [10, 60])
def test_naive_streaming_agrees_with_batch_and_forward(tiny_model, make_codes, frames):
    codes = torch.cat([make_codes(tiny_model, frames, seed=s) for s in range(2)])
    codes[0, 2, 3] = tiny_model.zero_token_id
    audio, text, mask, _ = forward_losses(tiny_model, codes)
    naive, batch = naive_streaming_losses(tiny_model, codes), batch_losses(tiny_model, codes)
    assert torch.equal(naive.valid, mask) and torch.equal(naive.valid, batch.valid)
    assert torch.equal(naive.text_valid, batch.text_valid)
    assert_losses_close(naive.losses, audio)
    assert_losses_close(naive.losses, batch.losses)
    assert_losses_close(naive.text_losses, text)
    assert naive.report["path"] == "naive_streaming"


def test_ragged_lists_evaluate_each_sequence_alone(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [25, 7, 18], seed=4)
    batch, naive = batch_losses(tiny_model, sequences), naive_streaming_losses(tiny_model, sequences)
    for b, seq in enumerate(sequences):
        T = seq.shape[1]
        audio, text, mask, _ = forward_losses(tiny_model, seq[None])
        for result in (batch, naive):
            assert torch.equal(result.valid[b, :, :T], mask[0]) and not result.valid[b, :, T:].any()
            assert_losses_close(result.losses[b, :, :T], audio[0])
            assert_losses_close(result.text_losses[b, :, :T], text[0])
    assert batch.lengths.tolist() == naive.lengths.tolist() == [25, 7, 18]
