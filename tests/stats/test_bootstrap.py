"""The cluster bootstrap recomputes the reported statistics, per resample, and its intervals mean what they say."""

from __future__ import annotations

import numpy as np
import pytest
from stats_fixtures import pooled, sequence_sums

from fused_stream.metrics import compute_metrics, log_slope
from fused_stream.stats.analysis import ModelSample, analyse
from fused_stream.stats.bootstrap import Plan, log_slopes, point_values, resample_matrix, statistics, unit_values
from fused_stream.stats.units import build_units, unit_slope_keys

WEIGHTS = [3.0, 1.0]


def _data(seed: int = 0, n: int = 6, lo: int = 6500, hi: int = 9200):
    rng = np.random.default_rng(seed)
    seqs = [sequence_sums(rng, int(rng.integers(lo, hi)), slope=-0.05, text=True, unit_effect=rng.normal(0, 0.3))
            for _ in range(n)]
    return sorted(seqs, key=lambda s: -s.frames)  # unit 0 the longest: every draw below keeps the full tiling


def test_a_resample_recomputes_what_compute_metrics_reports_on_the_drawn_units():
    seqs = _data()
    units = build_units(seqs.__getitem__, len(seqs), context=3000, window=500, codebook_weights=WEIGHTS)
    assert len(units.irregular) == len(seqs)  # each sequence's last frame: the delayed codebook is not scored
    W = np.array([[1, 1, 1, 1, 1, 1], [2, 0, 1, 0, 3, 0]], dtype=np.float64)
    plan = Plan.make(units.frames, window=500, context=3000)
    got = statistics(units, W, plan)
    for row, draw in enumerate(W):
        # the reference: compute_metrics on the drawn units, each as often as it was drawn
        drawn = [s for s, times in zip(seqs, draw, strict=True) for _ in range(int(times))]
        ref = compute_metrics(pooled(drawn), context=3000, window=500, codebook_weights=WEIGHTS)
        expected = point_values(ref, units, plan)
        compared = [k for k in expected if not k.startswith("per_unit") and np.isfinite(expected[k])]
        assert {"librilight_loss_8k", "librilight_slope_early", "slope_after_context", "loss_weighted",
                "loss_text", "window_500_1000"} <= set(compared)
        for key in compared:
            assert got[key][row] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("weights", [None, WEIGHTS])  # weighted: the flat keys follow the weighted curve
def test_each_units_own_values_are_its_metrics_alone(weights):
    seqs = _data(1, n=4)
    units = build_units(seqs.__getitem__, len(seqs), context=3000, window=500, codebook_weights=weights)
    plan = Plan.make(units.frames, window=500, context=3000)
    values = unit_values(units, plan)
    for u, seq in enumerate(seqs):
        alone = compute_metrics(seq, context=3000, window=500, codebook_weights=weights)
        assert values["loss_combined"][u] == pytest.approx(alone["overall"]["combined"], rel=1e-12)
        assert values["window_1000_1500"][u] == pytest.approx(alone["windows"][2]["combined"], rel=1e-12)
        for key, slope in unit_slope_keys(alone).items():
            assert (np.isnan(values[key][u]) and slope is None) or values[key][u] == slope


def test_vectorised_slopes_equal_log_slope_with_gaps():
    rng = np.random.default_rng(3)
    centers = np.array([250.0, 750.0, 1250.0, 1750.0, 2250.0])
    values = rng.normal(3.0, 0.2, (6, 5))
    values[1, [0, 3]] = np.nan
    values[2, :4] = np.nan  # one point left: no slope
    got = log_slopes(centers, values)
    for row in range(6):
        ref = log_slope(centers, values[row])
        assert (ref is None and np.isnan(got[row])) or got[row] == pytest.approx(ref, rel=1e-12)


def test_resample_matrix_draws_every_unit_count_and_is_seeded():
    W = resample_matrix(7, 500, seed=5)
    assert W.shape == (500, 7) and (W.sum(axis=1) == 7).all()
    assert W.mean() == pytest.approx(1.0) and (W == 0).mean() == pytest.approx((6 / 7) ** 7, abs=0.03)
    assert np.array_equal(W, resample_matrix(7, 500, seed=5)) and not np.array_equal(W, resample_matrix(7, 500, 6))


def _analyse(seqs, unit_ids=None, B=300, seed=1):
    unit_ids = unit_ids or list(range(len(seqs)))
    order = list(dict.fromkeys(unit_ids))

    def load(u):
        return pooled([s for s, v in zip(seqs, unit_ids, strict=True) if v == order[u]])

    metrics = compute_metrics(pooled(seqs), context=16, window=8)
    return analyse([ModelSample("m", load, metrics)], len(order), B=B, seed=seed).uncertainty["m"]


def test_seeded_intervals_are_bit_identical():
    seqs = _data(2, n=5, lo=60, hi=90)
    a, b = _analyse(seqs), _analyse(seqs)
    assert a == b and a["loss_combined"]["stderr"] > 0
    assert _analyse(seqs, seed=2)["loss_combined"] != a["loss_combined"]


def test_the_cluster_interval_is_wider_than_a_per_frame_one_when_frames_correlate():
    """Frames of one file share its level and drift together (AR(1)): resampling frames as if independent
    understates the uncertainty; resampling files does not."""
    rng = np.random.default_rng(4)
    files = [sequence_sums(rng, 40, codebooks=1, unit_effect=rng.normal(0, 0.5), rho=0.9) for _ in range(12)]
    frames = []
    for f in files:  # every frame as its own sequence of the same length: zero everywhere but at its position
        for t in range(f.frames):
            one = f.sums.clone() * 0
            keep = one.clone().long()
            one[:, t], keep[:, t] = f.sums[:, t], f.counts[:, t]
            frames.append(type(f)(f.names, one, keep, 1))
    by_file = _analyse(files, B=400)["loss_combined"]
    by_frame = _analyse(frames, B=400)["loss_combined"]
    assert by_file["value"] == pytest.approx(by_frame["value"], rel=1e-12)
    assert (by_file["n_units"], by_frame["n_units"]) == (12, 480)  # each unit's own value, in blocks of 256
    assert by_file["stderr"] > 2.5 * by_frame["stderr"]
    width = [e["ci95"][1] - e["ci95"][0] for e in (by_file, by_frame)]
    assert width[0] > 2.5 * width[1]


def test_units_gather_their_sequences():
    seqs = _data(5, n=6, lo=60, hi=90)
    books = _analyse(seqs, unit_ids=["a", "a", "b", "c", "c", "c"])
    assert books["loss_combined"]["n_units"] == 3
    assert books["loss_combined"]["value"] == _analyse(seqs)["loss_combined"]["value"]
