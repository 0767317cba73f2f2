"""Synthetic codes: layout, ranges, seeding."""

from __future__ import annotations

import pytest
import torch

from fused_stream.data import generate_codes


def test_tensor_layout_and_token_ranges(tiny_model):
    codes = generate_codes(tiny_model, 3, 50, seed=1)
    assert codes.shape == (3, tiny_model.num_codebooks, 50) and codes.dtype == torch.long
    assert codes[:, 0].min() >= 0 and codes[:, 0].max() < tiny_model.text_card
    assert codes[:, 1:].min() >= 0 and codes[:, 1:].max() < tiny_model.card
    assert codes[:, 0].max() >= tiny_model.card  # text draws from its own, larger vocabulary


def test_lengths_give_a_list_and_seeds_repeat(tiny_model):
    first = generate_codes(tiny_model, 2, [7, 3], seed=5)
    again = generate_codes(tiny_model, 2, [7, 3], seed=5)
    other = generate_codes(tiny_model, 2, [7, 3], seed=6)
    assert [c.shape[1] for c in first] == [7, 3]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_lengths_must_match_count(tiny_model):
    with pytest.raises(ValueError, match="2 lengths for 3 sequences"):
        generate_codes(tiny_model, 3, [4, 5])
