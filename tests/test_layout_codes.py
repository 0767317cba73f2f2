"""core/inputs.py's `layout_codes`: audio codebooks (or a full layout) laid out into the model's streams.

Kept apart from tests/test_inputs.py, which checks the codes every evaluator entry point accepts.
"""

from __future__ import annotations

import pytest
import torch
from codes_fixtures import K, audio_codes, full_codes

from fused_stream.core.inputs import layout_codes
from fused_stream.errors import DataError


@pytest.mark.parametrize("text_fill, text_value", [("zero", -1), ("pad", 3)])
@pytest.mark.parametrize("other_fill", ["zero", "copy"])
def test_layout_of_audio_codebooks(tiny_model, text_fill, text_value, other_fill):
    audio = audio_codes(T=6)
    expected = torch.full((K, 6), -1, dtype=torch.long)  # built by hand: text row, 8 Moshi rows, 8 user rows
    expected[0] = text_value
    expected[1:9] = audio
    if other_fill == "copy":
        expected[9:17] = audio
    out = layout_codes(tiny_model, audio, text_fill=text_fill, other_fill=other_fill)
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    more = torch.cat([audio, audio_codes(n=4, T=6, seed=9)])  # extra codebooks beyond dep_q are dropped
    assert torch.equal(layout_codes(tiny_model, more, text_fill=text_fill, other_fill=other_fill), expected)


def test_full_layout_passes_through_as_a_copy(tiny_model):
    codes = full_codes()
    out = layout_codes(tiny_model, codes, text_fill="pad", other_fill="copy")
    assert torch.equal(out, codes) and out.data_ptr() != codes.data_ptr()


def test_layout_errors(tiny_model):
    with pytest.raises(DataError, match="model expects dep_q=8 audio codebooks .*f.npy has 4"):
        layout_codes(tiny_model, audio_codes(n=4), source="f.npy")
    bad = audio_codes()
    bad[2, 5] = 64
    with pytest.raises(DataError, match=r"token 64 at row 2, frame 5, .*card \[0, 64\)"):
        layout_codes(tiny_model, bad, source="f.npy")
    full = full_codes()
    full[12, 7] = 2047  # a Moshi-sized Mimi code in a card-64 model
    with pytest.raises(DataError, match=r"token 2047 at row 12, frame 7.*card"):
        layout_codes(tiny_model, full)
    full[12, 7] = -2
    with pytest.raises(DataError, match="token -2"):
        layout_codes(tiny_model, full)
    with pytest.raises(DataError, match="text fill"):
        layout_codes(tiny_model, audio_codes(), text_fill="blank")
    with pytest.raises(DataError, match="other-stream fill"):
        layout_codes(tiny_model, audio_codes(), other_fill="noise")
