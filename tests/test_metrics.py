"""Long-context metrics against hand-computed references: NaN handling, weights, windows, slopes, flat keys, merging."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from fused_stream.core.result import EvalResult
from fused_stream.metrics import PositionSums, compute_metrics, log_slope, position_means, window_means

NAN = float("nan")


def _result(losses: list, text: list | None = None) -> EvalResult:
    """An EvalResult from nested lists [B, dep_q, T] (NaN = invalid); lengths = last valid position + 1."""
    x = torch.tensor(losses, dtype=torch.float32)
    t = torch.full((x.shape[0], 1, x.shape[2]), NAN) if text is None else torch.tensor(text, dtype=torch.float32)
    valid = ~x.isnan()
    lengths = torch.tensor([int(valid[b].any(0).nonzero().max()) + 1 if valid[b].any() else 0 for b in range(len(x))])
    return EvalResult(x, valid, t, ~t.isnan(), lengths)


def _curve_sums(curve: np.ndarray, n_sequences: int = 1) -> PositionSums:
    """PositionSums whose single audio codebook has mean `curve` (one sequence; NaN = no valid sequence)."""
    c = torch.tensor(curve, dtype=torch.float64)
    ok = ~c.isnan()
    sums = torch.stack([torch.where(ok, c, 0.0), torch.zeros_like(c)])
    counts = torch.stack([ok.long(), torch.zeros_like(ok, dtype=torch.long)])
    return PositionSums(["codebook_0", "text"], sums, counts, n_sequences)


# --- NaN handling and counts ---------------------------------------------------------------------------------------


def test_position_valid_in_one_of_three_sequences_and_in_none():
    # 3 sequences, 2 codebooks, T = 4. Position 1 is valid only in sequence 2; position 3 in no sequence.
    r = _result(
        [
            [[1.0, NAN, 2.0, NAN], [3.0, NAN, 4.0, NAN]],
            [[5.0, NAN, 6.0, NAN], [7.0, NAN, NAN, NAN]],
            [[9.0, 0.7, NAN, NAN], [11.0, 0.9, NAN, NAN]],
        ]
    )
    s = PositionSums.from_result(r)
    assert s.names == ["codebook_0", "codebook_1", "text"] and s.n_sequences == 3
    assert s.counts[0].tolist() == [3, 1, 2, 0] and s.counts[1].tolist() == [3, 1, 1, 0]
    curves = position_means(s)
    assert curves["codebook_0"][1] == pytest.approx(0.7) and curves["codebook_1"][1] == pytest.approx(0.9)
    assert curves["codebook_0"][2] == 4.0 and curves["codebook_1"][2] == 4.0
    assert curves["count"].tolist() == [3, 1, 2, 0]
    assert curves["combined"][0] == pytest.approx((5.0 + 7.0) / 2)  # codebook means 5 and 7
    assert curves["combined"][1] == pytest.approx(0.8)
    for key in ("codebook_0", "codebook_1", "combined", "text"):
        assert math.isnan(curves[key][3]), key  # never 0.0
    # The empty position is left out of its window, not averaged in as 0.
    assert window_means(curves["combined"], 2) == [(0, 2, pytest.approx((6.0 + 0.8) / 2)), (2, 4, 4.0)]
    m = compute_metrics(s, context=2, window=2)
    assert m["windows"][1]["combined"] == 4.0 and m["windows"][1]["positions"] == 1 and m["windows"][1]["count"] == 2
    assert m["overall"]["codebook_0"] == pytest.approx((1 + 2 + 5 + 6 + 9 + 0.7) / 6)
    assert m["overall"]["combined"] == pytest.approx((1 + 2 + 5 + 6 + 9 + 0.7 + 3 + 4 + 7 + 11 + 0.9) / 11)
    assert "text" not in m["overall"]  # no text position is valid


def test_ragged_lengths_count_per_position():
    # Sequence 0 has T = 5, sequence 1 T = 3 (NaN tail); codebook 1 is delayed by one frame (position 0 invalid).
    r = _result(
        [
            [[1.0, 1.0, 1.0, 1.0, 1.0], [NAN, 2.0, 2.0, 2.0, 2.0]],
            [[3.0, 3.0, 3.0, NAN, NAN], [NAN, 4.0, 4.0, NAN, NAN]],
        ],
        text=[[[0.5, 0.5, 0.5, 0.5, NAN]], [[1.5, NAN, NAN, NAN, NAN]]],
    )
    s = PositionSums.from_result(r)
    assert s.counts.tolist() == [[2, 2, 2, 1, 1], [0, 2, 2, 1, 1], [2, 1, 1, 1, 0]]
    assert s.sums[0].tolist() == [4.0, 4.0, 4.0, 1.0, 1.0] and s.sums[2].tolist() == [2.0, 0.5, 0.5, 0.5, 0.0]
    curves = position_means(s)
    assert curves["count"].tolist() == [2, 2, 2, 1, 1]
    assert curves["combined"].tolist() == [2.0, 2.5, 2.5, 1.5, 1.5]  # codebook 1 absent at 0: codebook 0 alone
    assert curves["text"][:4].tolist() == [1.0, 0.5, 0.5, 0.5] and math.isnan(curves["text"][4])


def test_sums_accumulate_float32_losses_in_float64():
    # 1e8 + 1 + 1 is 1e8 in float32 but exact in float64.
    s = PositionSums.from_result(_result([[[1e8]], [[1.0]], [[1.0]]]))
    assert s.sums.dtype == torch.float64 and s.sums[0, 0].item() == 100000002.0


def test_text_never_enters_combined():
    low = _result([[[1.0, 2.0]]], text=[[[0.0, 0.0]]])
    high = _result([[[1.0, 2.0]]], text=[[[50.0, 60.0]]])
    a, b = position_means(PositionSums.from_result(low)), position_means(PositionSums.from_result(high))
    assert a["combined"].tolist() == b["combined"].tolist() == [1.0, 2.0]
    assert compute_metrics(PositionSums.from_result(high), context=1, window=1)["overall"]["text"] == 55.0


# --- codebook weights -----------------------------------------------------------------------------------------------


def _eight_codebooks() -> PositionSums:
    # One sequence, 8 codebooks, T = 2. Position 0: codebook 0 = 2, others 1. Position 1: same but codebook 3 NaN.
    x = [[[2.0, 2.0]] + [[1.0, 1.0]] * 7]
    x[0][3] = [1.0, NAN]
    return PositionSums.from_result(_result(x))


def test_weighted_combined_by_hand():
    s = _eight_codebooks()
    weights = [100, 1, 1, 1, 1, 1, 1, 1]
    curves = position_means(s, weights)
    assert curves["weighted"][0] == pytest.approx((200 + 7) / 107, abs=1e-15)
    assert curves["weighted"][1] == pytest.approx((200 + 6) / 106, abs=1e-15)
    assert curves["combined"].tolist() == [pytest.approx(9 / 8), pytest.approx(8 / 7)]
    overall = compute_metrics(s, context=1, window=1, codebook_weights=weights)["overall"]
    # Pooled: codebook 0 holds S=4 over C=2, six codebooks S=2 over C=2, codebook 3 S=1 over C=1.
    assert overall["weighted"] == pytest.approx((100 * 4 + 6 * 2 + 1) / (100 * 2 + 6 * 2 + 1), abs=1e-15)
    assert overall["combined"] == pytest.approx(17 / 15, abs=1e-15)
    assert "weighted" not in compute_metrics(s, context=1, window=1)["overall"]


def test_wrong_weight_count_raises():
    s = _eight_codebooks()
    with pytest.raises(ValueError, match="one weight per audio codebook"):
        position_means(s, [100, 1, 1])
    with pytest.raises(ValueError, match="one weight per audio codebook"):
        compute_metrics(s, context=1, codebook_weights=[1.0] * 9)
    with pytest.raises(ValueError, match=">= 0"):
        position_means(s, [-1.0] + [1.0] * 7)


# --- windows and first frames ---------------------------------------------------------------------------------------


def test_windows_keep_a_trailing_half_window():
    curve = np.arange(35, dtype=np.float64)
    assert window_means(curve, 10) == [(0, 10, 4.5), (10, 20, 14.5), (20, 30, 24.5), (30, 35, 32.0)]
    assert [w[:2] for w in window_means(curve[:34], 10)] == [(0, 10), (10, 20), (20, 30)]  # 4 < 10 / 2: dropped
    m = compute_metrics(_curve_sums(curve), context=20, window=10)
    assert [(w["start"], w["end"], w["center"], w["combined"]) for w in m["windows"]] == [
        (0, 10, 5.0, 4.5),
        (10, 20, 15.0, 14.5),
        (20, 30, 25.0, 24.5),
        (30, 35, 32.5, 32.0),
    ]
    assert m["windows"][3]["codebook_0"] == 32.0 and m["windows"][3]["text"] is None
    assert m["windows"][3]["count"] == 5 and m["frames"] == 35 and m["window"] == 10 and m["context"] == 20


def test_window_mean_weighs_positions_equally():
    # Position 0: two sequences at 1.0; position 1: one sequence at 4.0. Window mean (1 + 4) / 2, pooled 6 / 3.
    s = PositionSums.from_result(_result([[[1.0, 4.0]], [[1.0, NAN]]]))
    m = compute_metrics(s, context=1, window=2)
    assert m["windows"][0]["combined"] == 2.5 and m["overall"]["combined"] == 2.0


def test_first_frames_by_hand():
    curve = np.arange(1100, dtype=np.float64)  # mean over [0, L) = (L - 1) / 2
    m = compute_metrics(_curve_sums(curve), context=3000, window=100)
    assert m["first_frames"] == {"512": 255.5, "1024": 511.5, "1100": 549.5}
    m = compute_metrics(_curve_sums(curve[:1024]), context=3000, window=100)
    assert m["first_frames"] == {"512": 255.5, "1024": 511.5}
    assert compute_metrics(_curve_sums(curve[:300]), context=3000, window=100)["first_frames"] == {"300": 149.5}


# --- slopes ---------------------------------------------------------------------------------------------------------


def test_log_slope_by_hand():
    # x = ln(centers) = 0, 1, 2; y = 1, 2, 4: slope = sum (x - 1)(y - 7/3) / sum (x - 1)^2 = (4/3 + 5/3) / 2.
    assert log_slope([1.0, math.e, math.e**2], [1.0, 2.0, 4.0]) == pytest.approx(1.5, abs=1e-12)
    assert log_slope([1.0, math.e, math.e**2], [1.0, NAN, 4.0]) == pytest.approx(1.5, abs=1e-12)
    assert log_slope([5.0], [1.0]) is None and log_slope([5.0, 6.0], [1.0, NAN]) is None
    with pytest.raises(ValueError, match="> 0"):
        log_slope([0.0, 1.0], [1.0, 2.0])


def test_slopes_recover_b_from_a_curve_linear_in_log_center():
    # Constant within each window at a + b ln(center): window means are exactly on the line, so slopes equal b.
    a, b, w, T = 3.0, -0.25, 10, 200
    curve = np.array([a + b * math.log((t // w) * w + w / 2) for t in range(T)])
    m = compute_metrics(_curve_sums(curve), context=100, window=w)
    assert m["slopes"]["all"] == pytest.approx(b, abs=1e-12)
    assert m["slopes"]["before_context"] == pytest.approx(b, abs=1e-12)
    assert m["slopes"]["after_context"] == pytest.approx(b, abs=1e-12)


def test_slopes_of_a_smooth_log_curve_within_the_window_bias():
    # loss(t) = a + b ln t (t >= 1; position 0 has no value). A window's mean of ln t is
    # ln(c) - w^2 / (24 c^2) + O(c^-4) (ln is concave), so the window means sit on a curve whose derivative in ln c
    # departs from b by at most |b| w^2 / (12 c_min^2). A least-squares slope is a positively weighted average of
    # secant slopes, hence of such derivatives: |slope - b| <= |b| w^2 / (12 c_min^2), plus 10% for the higher-order
    # terms.
    a, b, w, T = 2.0, -0.3, 1000, 30000
    t = np.arange(T, dtype=np.float64)
    curve = np.where(t >= 1, a + b * np.log(np.maximum(t, 1)), np.nan)
    m = compute_metrics(_curve_sums(curve), context=3000, window=w)

    def bound(c_min: float) -> float:
        return 1.1 * abs(b) * w**2 / (12 * c_min**2)

    assert abs(m["flat"]["librilight_slope"] - b) <= bound(8500)  # windows centered 8500 ... 29500
    assert abs(m["slopes"]["after_context"] - b) <= bound(3500)
    assert abs(m["flat"]["librilight_slope_late"] - b) <= bound(16500)
    assert abs(m["flat"]["librilight_slope_middle"] - b) <= bound(8500)
    assert abs(m["flat"]["librilight_slope_early"] - b) <= bound(4500)
    # The bias is real (the test could fail): the first window averages ln t from t = 1, far below ln 500.
    assert abs(m["slopes"]["all"] - b) > bound(8500)
    assert m["flat"]["librilight_loss_8k"] == pytest.approx(a + b * np.log(np.arange(7500, 8500)).mean(), abs=1e-12)


# --- flat keys ------------------------------------------------------------------------------------------------------


def test_flat_keys_present_or_absent_by_length():
    curve = np.arange(9000, dtype=np.float64)
    flat = compute_metrics(_curve_sums(curve, n_sequences=4), context=3000)["flat"]
    assert flat["librilight_loss_8k"] == 7999.5  # window [7500, 8500) fits in T = 9000
    assert flat["librilight_loss_1k"] == 999.5
    assert "librilight_loss_9k" not in flat and "librilight_loss_16k" not in flat
    assert flat["librilight_samples"] == 4
    assert "librilight_slope" not in flat  # one window centered in [8000, 9000]: 8500
    assert "librilight_slope_middle" not in flat and "librilight_slope_late" not in flat
    assert flat["librilight_slope_early"] == pytest.approx(
        log_slope([4500, 5500, 6500, 7500], [4499.5, 5499.5, 6499.5, 7499.5]), abs=1e-9
    )
    flat = compute_metrics(_curve_sums(curve[:8400]), context=3000)["flat"]
    assert "librilight_loss_8k" not in flat and flat["librilight_loss_7k"] == 6999.5 and flat["librilight_samples"] == 1


def test_flat_key_omitted_when_its_window_has_no_value():
    curve = np.arange(9000, dtype=np.float64)
    curve[7500:8500] = np.nan
    m = compute_metrics(_curve_sums(curve), context=3000)
    assert "librilight_loss_8k" not in m["flat"] and m["windows"][7]["combined"] == 7249.5  # [7000, 7500) only
    assert m["windows"][8]["combined"] == 8749.5  # [8000, 9000) averages only 8500 ... 8999


def test_slopes_absent_with_fewer_than_two_windows():
    m = compute_metrics(_curve_sums(np.arange(1400.0)), context=3000, window=1000)  # 400 < 500: one window
    assert len(m["windows"]) == 1 and m["slopes"] == {"all": None, "before_context": None, "after_context": None}
    m = compute_metrics(_curve_sums(np.arange(1500.0)), context=3000, window=1000)  # 500 >= 500: two windows
    assert m["slopes"]["all"] == pytest.approx((1249.5 - 499.5) / math.log(1250 / 500), abs=1e-9)
    assert m["slopes"]["after_context"] is None
    assert set(compute_metrics(PositionSums.empty(["codebook_0", "text"]), context=3000)["flat"]) == {
        "librilight_samples", "librilight_metrics_version"  # no loss at all: not even librilight_loss_overall
    }


# --- merging and saving ---------------------------------------------------------------------------------------------


def _random_result(gen: torch.Generator, B: int, T: int) -> EvalResult:
    x = torch.rand(B, 3, T, generator=gen, dtype=torch.float32) * 7
    x[torch.rand(B, 3, T, generator=gen) < 0.3] = NAN
    t = torch.rand(B, 1, T, generator=gen, dtype=torch.float32) * 9
    t[torch.rand(B, 1, T, generator=gen) < 0.3] = NAN
    return EvalResult(x, ~x.isnan(), t, ~t.isnan(), torch.full((B,), T))


def _concat(a: EvalResult, b: EvalResult) -> EvalResult:
    T = max(a.losses.shape[-1], b.losses.shape[-1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[-1]), value=NAN)

    x = torch.cat([pad(a.losses), pad(b.losses)])
    t = torch.cat([pad(a.text_losses), pad(b.text_losses)])
    return EvalResult(x, ~x.isnan(), t, ~t.isnan(), torch.cat([a.lengths, b.lengths]))


def test_add_partials_in_either_order_equals_the_concatenated_result():
    gen = torch.Generator().manual_seed(0)
    r1, r2 = _random_result(gen, 2, 50), _random_result(gen, 3, 80)
    whole = PositionSums.from_result(_concat(r1, r2))
    p1, p2 = PositionSums.from_result(r1), PositionSums.from_result(r2)
    for merged in (p1.add(p2), p2.add(p1), PositionSums.empty(p1.names).add(p2).add(p1)):
        assert merged.names == whole.names and merged.n_sequences == 5
        assert torch.equal(merged.counts, whole.counts)
        assert torch.allclose(merged.sums, whole.sums, rtol=0, atol=1e-12)
    assert whole.counts[:, 50:].max() <= 3  # only r2 reaches past frame 50
    with pytest.raises(ValueError, match="names differ"):
        p1.add(PositionSums.empty(["codebook_0", "text"]))


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(1)
    s = PositionSums.from_result(_random_result(gen, 2, 30))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    back = PositionSums.from_state_dict(torch.load(buf))
    assert back.names == s.names and back.n_sequences == s.n_sequences
    assert torch.equal(back.sums, s.sums) and torch.equal(back.counts, s.counts)
    with pytest.raises(ValueError, match="lacks"):
        PositionSums.from_state_dict({"names": s.names})
    with pytest.raises(ValueError, match="float64"):
        PositionSums(s.names, s.sums.float(), s.counts, 2)


def test_metrics_are_strict_json():
    gen = torch.Generator().manual_seed(2)
    r = _random_result(gen, 2, 700)
    r.losses[:, :, 600:] = NAN  # a window with no value at all
    m = compute_metrics(PositionSums.from_result(r), context=300, window=100, codebook_weights=[100, 1, 1])
    assert m["windows"][6]["combined"] is None
    text = json.dumps(m, allow_nan=False)  # no NaN anywhere: NaN became None or an omitted key
    assert json.loads(text) == m
