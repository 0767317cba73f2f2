"""The alignment contract against moshi's own delay code and `LMModel.forward` masks."""

from __future__ import annotations

import torch
from moshi.models.lm_utils import _delay_sequence
from reference_ce import forward_losses

from fused_stream.core.alignment import audio_delays, delayed_sequence, initial_tokens, text_delay, valid_masks


def test_delays_split_into_text_and_audio(tiny_model):
    assert text_delay(tiny_model) == tiny_model.delays[0]
    assert audio_delays(tiny_model) == tiny_model.delays[1 : 1 + tiny_model.dep_q]
    assert initial_tokens(tiny_model).view(1, -1, 1).tolist() == tiny_model._get_initial_token().tolist()


def test_delayed_sequence_matches_lmmodel_forward_construction(tiny_model, make_codes):
    codes = torch.cat([make_codes(tiny_model, 23, seed=s) for s in range(2)])
    initial = tiny_model._get_initial_token().expand(2, -1, -1)
    expected = torch.cat([initial, _delay_sequence(tiny_model.delays, codes, initial)], dim=2)  # [B, K, T + 1]
    assert torch.equal(delayed_sequence(tiny_model, codes), expected)


def test_delayed_sequence_keeps_last_codes_then_zero_tokens(tiny_model, make_codes):
    codes = make_codes(tiny_model, 10, seed=3)
    padded = delayed_sequence(tiny_model, codes, length=17)
    assert torch.equal(padded[:, :, :11], delayed_sequence(tiny_model, codes))
    # Past T + 1 a stream with delay d still holds its last d codes, then zero tokens.
    for k, d in enumerate(tiny_model.delays):
        assert torch.equal(padded[0, k, 11 : 11 + d], codes[0, k, 10 - d :])
        assert (padded[0, k, 11 + d :] == tiny_model.zero_token_id).all()


def test_valid_masks_equal_forward_masks(tiny_model, make_codes):
    codes = torch.cat([make_codes(tiny_model, 30, seed=s) for s in range(3)])
    codes[0, 0, 4] = codes[1, 5, 0] = codes[2, 16, 29] = codes[2, 1, 12] = tiny_model.zero_token_id
    _, _, mask, text_mask = forward_losses(tiny_model, codes)
    audio, text = valid_masks(tiny_model, codes, torch.tensor([30, 30, 30]))
    assert torch.equal(audio, mask) and torch.equal(text, text_mask)


def test_valid_masks_of_short_sequences_follow_their_own_length(tiny_model, make_codes):
    codes = torch.cat([make_codes(tiny_model, 30, seed=s) for s in range(2)])
    audio, text = valid_masks(tiny_model, codes, torch.tensor([30, 12]))
    _, _, mask_alone, text_mask_alone = forward_losses(tiny_model, codes[1:, :, :12])
    assert torch.equal(audio[1, :, :12], mask_alone[0]) and torch.equal(text[1, :, :12], text_mask_alone[0])
    assert not audio[1, :, 12:].any() and not text[1, :, 12:].any()
    # Hand check: Moshi's acoustic codebooks (delay 1) lose exactly their last frame, the semantic one none.
    delays = torch.tensor(audio_delays(tiny_model))
    assert audio[1, :, :12].sum(dim=-1).tolist() == (12 - delays).tolist()
