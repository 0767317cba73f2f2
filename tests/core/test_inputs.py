"""Input validation of every public entry point, the invalid_tokens="mask" policy, and the batching helpers."""

from __future__ import annotations

import re

import pytest
import torch
from codes_fixtures import K, audio_codes, full_codes

from fused_stream import EvalConfig, StreamingEvaluator, batch_losses, naive_streaming_losses
from fused_stream.core.inputs import batches_by_length, check_codes, layout_codes, pad_batch
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import load_model
from fused_stream.errors import DataError

T = 24  # frames per sequence: > the tiny preset's context is not needed here, validation runs before compute
B = 3


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def _streaming(model, codes, **kwargs):
    return StreamingEvaluator(model, EvalConfig(**kwargs)).evaluate(codes)


def _batch(model, codes, **kwargs):
    return batch_losses(model, codes, **kwargs)


def _naive(model, codes, **kwargs):
    return naive_streaming_losses(model, codes, **kwargs)


ENTRY_POINTS = {"streaming": _streaming, "batch": _batch, "naive": _naive}


@pytest.fixture(params=list(ENTRY_POINTS))
def entry(request):
    return ENTRY_POINTS[request.param]


def _codes(model, n: int = B, frames: int = T, seed: int = 0) -> torch.Tensor:
    return generate_codes(model, n, frames, seed=seed)


def _assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from the error message: {message!r}"


# --- structural problems: shape, K, dtype, length ---------------------------------------------------------------


def test_valid_codes_pass_through_every_entry_point(model, entry):
    result = entry(model, _codes(model))
    assert result.losses.shape == (B, model.dep_q, T)
    assert result.n_masked_tokens == 0
    assert result.valid.any()


def test_ndim_2_tensor_raises(model, entry):
    codes = _codes(model)[0]  # [K, T]: a single sequence without its batch dimension
    with pytest.raises(ValueError, match=re.escape("[B, K, T]")) as info:
        entry(model, codes)
    _assert_names(str(info.value), str(tuple(codes.shape)))


def test_ndim_4_tensor_raises(model, entry):
    codes = _codes(model).unsqueeze(0)  # [1, B, K, T]
    with pytest.raises(ValueError, match=re.escape("[B, K, T]")) as info:
        entry(model, codes)
    _assert_names(str(info.value), str(tuple(codes.shape)))


def test_list_item_of_ndim_1_raises(model, entry):
    codes = list(_codes(model).unbind(0))
    codes[1] = codes[1][0]  # [T]
    with pytest.raises(ValueError, match=re.escape("codes[1]")) as info:
        entry(model, codes)
    _assert_names(str(info.value), f"({T},)")


def test_wrong_number_of_streams_raises(model, entry):
    codes = _codes(model)[:, :9]
    assert model.num_codebooks == 17
    with pytest.raises(ValueError, match="9 streams") as info:
        entry(model, codes)
    _assert_names(str(info.value), "batch index 0", "17")


def test_wrong_number_of_streams_in_a_list_names_the_batch_index(model, entry):
    codes = list(_codes(model).unbind(0))
    codes[2] = codes[2][:9]
    with pytest.raises(ValueError, match="batch index 2 has 9 streams"):
        entry(model, codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_dtype_raises(model, entry, dtype):
    codes = _codes(model).to(dtype)
    with pytest.raises(ValueError, match="integer") as info:
        entry(model, codes)
    _assert_names(str(info.value), str(dtype))


def test_empty_time_axis_raises(model, entry):
    codes = torch.zeros((2, model.num_codebooks, 0), dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("T = 0")):
        entry(model, codes)


def test_empty_sequence_in_a_list_names_the_batch_index(model, entry):
    codes = list(_codes(model).unbind(0))
    codes[1] = codes[1][:, :0]
    with pytest.raises(ValueError, match=re.escape("batch index 1 is empty (T = 0)")):
        entry(model, codes)


def test_empty_list_raises(model, entry):
    with pytest.raises(ValueError, match="empty"):
        entry(model, [])


def test_empty_batch_tensor_raises(model, entry):
    with pytest.raises(ValueError, match="batch size 0"):
        entry(model, torch.zeros((0, model.num_codebooks, T), dtype=torch.long))


def test_unknown_invalid_tokens_policy_raises(model, entry):
    with pytest.raises(ValueError, match="invalid_tokens"):
        entry(model, _codes(model), invalid_tokens="drop")


# --- out-of-range tokens: stream, batch index and first offending position --------------------------------------


def _bad_audio_equal_card(model, codes):
    codes[1, 3, 17] = model.card
    codes[1, 3, 21] = model.card + 5  # later in the same stream: must not be the one named
    codes[2, 3, 2] = model.card  # a later batch element: must not be the one named
    return 3, 1, 17, model.card


def _bad_text_equal_text_card(model, codes):
    codes[1, 0, 17] = model.text_card
    codes[1, 0, 20] = model.text_card + 1
    return 0, 1, 17, model.text_card


def _bad_negative_audio(model, codes):
    codes[1, 12, 17] = -2  # a user audio stream: not predicted, still checked
    codes[1, 12, 19] = -7
    return 12, 1, 17, -2


def _bad_huge_audio(model, codes):
    codes[1, 8, 17] = 2**40  # does not fit int32: must not wrap around into range
    codes[1, 8, 18] = model.card
    return 8, 1, 17, 2**40


BAD_TOKENS = {
    "audio_eq_card": _bad_audio_equal_card,
    "text_eq_text_card": _bad_text_equal_text_card,
    "negative_audio": _bad_negative_audio,
    "huge_audio": _bad_huge_audio,
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
@pytest.mark.parametrize("as_list", [False, True], ids=["tensor", "list"])
def test_out_of_range_token_names_stream_batch_and_first_position(model, entry, case, as_list):
    codes = _codes(model)
    stream, batch_index, position, value = BAD_TOKENS[case](model, codes)
    inputs = list(codes.unbind(0)) if as_list else codes
    with pytest.raises(ValueError, match=rf"\bstream {stream}\b") as info:
        entry(model, inputs)
    message = str(info.value)
    _assert_names(message, f"batch index {batch_index}", f"position {position}", f"invalid token {value}")
    assert re.search(rf"\bposition {position}\b", message), message
    assert re.search(rf"\bbatch index {batch_index}\b", message), message
    if stream == 0:
        _assert_names(message, "text", f"text_card={model.text_card}")
    else:
        _assert_names(message, "audio", f"card={model.card}")
    _assert_names(message, "invalid_tokens='mask'")


def test_text_stream_accepts_tokens_between_card_and_text_card(model, entry):
    assert model.card < model.text_card
    codes = _codes(model)
    codes[1, 0, 5] = model.text_card - 1  # valid text token, would be out of range for an audio stream
    codes[2, 0, 6] = model.card
    result = entry(model, codes)
    assert result.text_valid[1, 0, 5] and result.text_valid[2, 0, 6]
    assert torch.isfinite(result.text_losses[1, 0, 5]) and torch.isfinite(result.text_losses[2, 0, 6])
    codes[2, 1, 6] = model.card  # ... but not in an audio stream
    with pytest.raises(ValueError, match="stream 1 .*batch index 2, position 6"):
        entry(model, codes)


def test_zero_token_is_accepted_and_not_scored(model, entry):
    codes = _codes(model)
    codes[1, 0, 7] = model.zero_token_id
    codes[1, 4, 9] = model.zero_token_id
    codes[0, 14, 3] = model.zero_token_id  # user audio: an input only
    assert model.zero_token_id == -1
    result = entry(model, codes)
    assert result.n_masked_tokens == 0
    assert not result.text_valid[1, 0, 7] and result.text_losses[1, 0, 7].isnan()
    assert not result.valid[1, 3, 9] and result.losses[1, 3, 9].isnan()
    assert result.text_valid[1, 0, 8] and result.valid[1, 3, 10]


def test_int32_codes_give_the_same_losses_as_int64(model):
    codes = _codes(model)
    a = batch_losses(model, codes)
    b = batch_losses(model, codes.to(torch.int32))
    checked = check_codes(model, codes.to(torch.int32))
    assert all(s.dtype == torch.long for s in checked.sequences)
    assert torch.equal(torch.stack(checked.sequences), codes)
    torch.testing.assert_close(a.losses, b.losses, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(a.text_losses, b.text_losses, equal_nan=True, rtol=0, atol=0)


# --- invalid_tokens="mask" ----------------------------------------------------------------------------------------


FRAMES = 40
# (batch, stream, time, value): every kind of bad token, in predicted and input-only streams.
MASKED = [
    (1, 0, 17, "text_card"),  # text
    (1, 3, 9, "card"),  # audio codebook 2
    (1, 3, 30, -5),  # same stream, negative
    (0, 8, 20, 1000),  # last Moshi audio codebook
    (2, 12, 4, "card+100"),  # user audio stream: input only, no loss of its own
]


def _corrupt(model, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes with the MASKED bad tokens, the same codes with those tokens replaced by the zero token by hand)."""
    values = {"text_card": model.text_card, "card": model.card, "card+100": model.card + 100}
    bad, fixed = codes.clone(), codes.clone()
    for b, k, t, v in MASKED:
        bad[b, k, t] = values.get(v, v)
        fixed[b, k, t] = model.zero_token_id
    return bad, fixed


def test_mask_policy_equals_hand_masked_codes(model, entry):
    clean = _codes(model, frames=FRAMES, seed=5)
    bad, fixed = _corrupt(model, clean)
    bad_before = bad.clone()

    result = entry(model, bad, invalid_tokens="mask")
    expected = batch_losses(model, fixed)

    assert result.n_masked_tokens == len(MASKED)
    assert expected.n_masked_tokens == 0
    assert torch.equal(bad, bad_before), "masking must not modify the caller's codes"
    # The masked positions were scored on clean codes and are not any more.
    reference_clean = batch_losses(model, clean)
    for b, k, t, _ in MASKED:
        if k == 0:
            assert reference_clean.text_valid[b, 0, t] and not result.text_valid[b, 0, t]
            assert result.text_losses[b, 0, t].isnan()
        elif k <= model.dep_q:
            assert reference_clean.valid[b, k - 1, t] and not result.valid[b, k - 1, t]
            assert result.losses[b, k - 1, t].isnan()
    assert torch.equal(result.valid, expected.valid)
    assert torch.equal(result.text_valid, expected.text_valid)
    assert torch.equal(result.lengths, expected.lengths)
    assert torch.equal(result.losses.isnan(), ~result.valid)
    assert torch.equal(result.text_losses.isnan(), ~result.text_valid)
    assert (result.losses[result.valid] - expected.losses[expected.valid]).abs().max() <= 1e-4
    assert (result.text_losses[result.text_valid] - expected.text_losses[expected.text_valid]).abs().max() <= 1e-4
    # The input-only user stream token changes the other streams' context: the result must not equal clean codes.
    assert not torch.allclose(result.losses[2].nan_to_num(), reference_clean.losses[2].nan_to_num())


def test_mask_policy_with_a_list_of_lengths(model):
    clean = generate_codes(model, 3, [FRAMES, 31, 12], seed=6)
    bad = [s.clone() for s in clean]
    fixed = [s.clone() for s in clean]
    for b, k, t in [(1, 2, 30), (1, 0, 3), (2, 16, 11)]:
        bad[b][k, t] = model.card + 1 if k else model.text_card + 1
        fixed[b][k, t] = model.zero_token_id
    result = StreamingEvaluator(model, EvalConfig(invalid_tokens="mask", batch_size=2, chunk_size=4)).evaluate(bad)
    expected = batch_losses(model, fixed)
    assert result.n_masked_tokens == 3
    assert torch.equal(result.valid, expected.valid)
    assert torch.equal(result.text_valid, expected.text_valid)
    assert torch.equal(result.lengths, torch.tensor([FRAMES, 31, 12]))
    assert (result.losses[result.valid] - expected.losses[expected.valid]).abs().max() <= 1e-4
    assert (result.text_losses[result.text_valid] - expected.text_losses[expected.text_valid]).abs().max() <= 1e-4


def test_raise_is_the_default_policy(model):
    codes = _codes(model)
    codes[1, 3, 17] = model.card
    with pytest.raises(ValueError, match="position 17"):
        check_codes(model, codes)
    checked = check_codes(model, codes, "mask")
    assert checked.n_masked_tokens == 1
    assert checked.sequences[1][3, 17] == model.zero_token_id
    assert all(s.dtype == torch.long for s in checked.sequences)


# --- EvalConfig --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -3}, "chunk_size"),
        ({"chunk_size": 1.5}, "chunk_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"invalid_tokens": "drop"}, "invalid_tokens"),
        ({"invalid_tokens": "MASK"}, "invalid_tokens"),
    ],
)
def test_eval_config_rejects_bad_values(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=field):
        StreamingEvaluator(model, EvalConfig(**kwargs))


def test_eval_config_accepts_good_values(model):
    for kwargs in [{}, {"chunk_size": 8, "batch_size": 1}, {"invalid_tokens": "mask"}, {"batch_size": None}]:
        EvalConfig(**kwargs).validate()
        assert StreamingEvaluator(model, EvalConfig(**kwargs)).config == EvalConfig(**kwargs)


# --- pad_batch / batches_by_length -------------------------------------------------------------------------------


def test_pad_batch_pads_with_the_zero_token(model):
    lengths = [5, 9, 3]
    sequences = generate_codes(model, 3, lengths, seed=2)
    padded, out_lengths = pad_batch(model, sequences)
    assert padded.shape == (3, model.num_codebooks, 9)
    assert padded.dtype == torch.long
    assert torch.equal(out_lengths, torch.tensor(lengths))
    assert out_lengths.dtype == torch.long
    for b, (seq, n) in enumerate(zip(sequences, lengths, strict=True)):
        assert torch.equal(padded[b, :, :n], seq)
        assert (padded[b, :, n:] == -1).all()
    assert (padded[1] != -1).all()  # the longest sequence is not padded at all


def test_batches_by_length_groups_longest_first():
    lengths = [3, 10, 7, 10, 1, 5, 8]
    batches = batches_by_length(lengths, 3)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert set(batches[0]) == {1, 3, 6}
    for first, second in zip(batches, batches[1:], strict=False):
        assert min(lengths[i] for i in first) >= max(lengths[i] for i in second)


@pytest.mark.parametrize("batch_size", [None, 7, 100])
def test_batches_by_length_single_batch(batch_size):
    lengths = [4, 2, 9, 9, 1, 6, 3]
    batches = batches_by_length(lengths, batch_size)
    assert len(batches) == 1
    assert sorted(batches[0]) == list(range(7))
    assert [lengths[i] for i in batches[0]] == sorted(lengths, reverse=True)


def test_batches_by_length_batch_size_one():
    lengths = [2, 5, 3]
    assert batches_by_length(lengths, 1) == [[1], [2], [0]]


@pytest.mark.parametrize("batch_size", [0, -2])
def test_batches_by_length_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        batches_by_length([3, 4], batch_size)


def test_first_offending_position_is_the_earliest_frame(model, entry):
    codes = _codes(model)
    codes[1, 3, 17] = model.card  # a lower stream, but a later frame
    codes[1, 5, 10] = model.card  # the earliest frame: this one is reported
    with pytest.raises(ValueError, match=r"stream 5 .*batch index 1, position 10\b"):
        entry(model, codes)


# --------------------------------------------------------------------------------------------------------------
# layout_codes: audio codebooks (or a full layout) laid out into the model's streams
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_fill, text_value", [("zero", -1), ("pad", 3)])
@pytest.mark.parametrize("other_fill", ["zero", "copy"])
def test_layout_of_audio_codebooks(tiny_model, text_fill, text_value, other_fill):
    audio = audio_codes(T=16)
    expected = torch.full((K, 16), -1, dtype=torch.long)  # built by hand: text row, 8 Moshi rows, 8 user rows
    expected[0] = text_value
    expected[1:9] = audio
    if other_fill == "copy":
        expected[9:17] = audio
    out = layout_codes(tiny_model, audio, text_fill=text_fill, other_fill=other_fill)
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    more = torch.cat([audio, audio_codes(n=4, T=16, seed=9)])  # extra codebooks beyond dep_q are dropped
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


# --- layout_codes: shapes and values that cannot be codes, refused alike for files (CLI) and tensors (API) ----------


def test_transposed_codes_are_refused(tiny_model):
    audio = audio_codes(T=300)
    for shape_source in (audio.T, audio_codes(T=20).T):  # [300, 8]: too many rows; [20, 8]: more rows than frames
        with pytest.raises(DataError, match=r"f\.npy has shape .*\(transposed\?\)") as info:
            layout_codes(tiny_model, shape_source, source="f.npy")
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"\(17, 12\): more rows .*than frames.*transposed\?"):
        layout_codes(tiny_model, full_codes(T=12))  # the full layout's rows count too: 17 streams, 12 frames
    # As many frames as rows cannot be told from its transpose either: refused by the same rule (issue 23, item 8;
    # this used to be accepted). One frame more is accepted.
    with pytest.raises(DataError, match=r"\(17, 17\): more rows \(codebooks\) than frames, or as many.*transposed\?"):
        layout_codes(tiny_model, full_codes(T=17))
    assert layout_codes(tiny_model, full_codes(T=18)).shape == (K, 18)
    assert torch.equal(layout_codes(tiny_model, audio)[1:9], audio)
    short = audio_codes(T=3)  # a short file this tool encoded itself: Mimi's [dep_q, T], whatever T
    assert torch.equal(layout_codes(tiny_model, short, from_mimi=True)[1:9], short)
    with pytest.raises(DataError, match="transposed"):
        layout_codes(tiny_model, short)


def test_more_rows_than_any_mimi_unless_exactly_the_models_streams():
    from types import SimpleNamespace

    from fused_stream.core.inputs import MIMI_MAX_CODEBOOKS, check_codes_shape

    assert MIMI_MAX_CODEBOOKS == 32
    wide = SimpleNamespace(num_codebooks=33)  # a model with 16 audio codebooks per speaker: K = 33 > 32
    check_codes_shape(wide, (33, 100), "x")  # exactly the model's full layout
    check_codes_shape(wide, (32, 100), "x")  # every codebook of a 32-codebook Mimi
    with pytest.raises(DataError, match=r"x has shape \(34, 100\): 34 rows, more codebooks than any Mimi has \(32\)"):
        check_codes_shape(wide, (34, 100), "x")


def test_extra_codebooks_are_a_warning_naming_the_source(tiny_model, caplog):
    wider = audio_codes(n=12, T=24)
    with caplog.at_level("WARNING", logger="fused_stream.core.inputs"):
        out = layout_codes(tiny_model, wider, source="f.npy")
    assert torch.equal(out[1:9], wider[:8])
    (record,) = [r for r in caplog.records if "f.npy" in r.getMessage()]
    assert record.levelname == "WARNING" and "12 audio codebooks, using the first dep_q=8" in record.getMessage()


@pytest.mark.parametrize(
    "value, message",
    [(2.5, r"a non-integer value 2\.5 at row 3, frame 7"), (float("nan"), "a non-finite value nan at row 3, frame 7"),
     (float("-inf"), "a non-finite value -inf at row 3, frame 7")],
)
def test_non_integer_and_non_finite_values_are_refused(tiny_model, value, message):
    codes = audio_codes(T=24).double()
    codes[3, 7] = value
    codes[5, 9] = value  # later: not the one named
    with pytest.raises(DataError, match=rf"^f\.npy holds {message}: codes must be integers$"):
        layout_codes(tiny_model, codes, source="f.npy")


def test_whole_floats_are_accepted_and_floats_that_lost_integers_refused(tiny_model):
    from fused_stream.core.inputs import integer_codes

    codes = audio_codes(T=24)
    assert torch.equal(layout_codes(tiny_model, codes.float()), layout_codes(tiny_model, codes))
    full = full_codes()
    assert torch.equal(layout_codes(tiny_model, full.double()), full)  # the zero token -1.0 included
    for dtype, limit in [(torch.float16, 2048), (torch.bfloat16, 256)]:
        big = torch.zeros(2, 3, dtype=dtype)
        big[1, 2] = 2 * limit  # a whole number in the dtype, but integers above `limit` were rounded to get there
        with pytest.raises(DataError, match=rf"y holds beyond {limit}, where {dtype} stops .* at row 1, frame 2"):
            integer_codes(big, "y")
        big[1, 2] = limit
        assert integer_codes(big, "y")[1, 2] == limit
    with pytest.raises(DataError, match="dtype torch.bool"):
        layout_codes(tiny_model, torch.ones(8, 24, dtype=torch.bool))


def test_the_api_refuses_what_the_cli_refuses(tiny_model):
    """The API lays items out with `layout_codes`: the same shape and value rules, naming the item."""
    from fused_stream.api import evaluate_long_context_loss

    fraction = audio_codes(T=24).float()
    fraction[2, 4] = 3.5  # truncated to 3 before: a silently different code
    nan = audio_codes(T=24).float()
    nan[0, 0] = float("nan")  # reported as token -9223372036854775808 before
    for item, message in [(fraction, r"codes_list\[1\] holds a non-integer value 3\.5 at row 2, frame 4"),
                          (nan, r"codes_list\[1\] holds a non-finite value nan at row 0, frame 0"),
                          (audio_codes(T=300).T, r"codes_list\[1\] has shape \(300, 8\).*transposed\?")]:
        with pytest.raises(DataError, match=message):
            evaluate_long_context_loss(tiny_model, [audio_codes(T=24), item])
