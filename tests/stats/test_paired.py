"""The paired bootstrap: calibrated under a null, finds a planted effect, gains from pairing, exact on a tie."""

from __future__ import annotations

import numpy as np
import pytest
from stats_fixtures import pooled, sequence_sums

from fused_stream.metrics import compute_metrics
from fused_stream.stats.analysis import ModelSample, analyse
from fused_stream.stats.bootstrap import Plan, resample_matrix, statistics
from fused_stream.stats.paired import paired_test
from fused_stream.stats.units import build_units

N, T, WINDOW, CONTEXT = 16, 16, 8, 8


def _dataset(rng, effect: float = 0.0, unit_sd: float = 1.0, model_sd: float = 0.3):
    """Two models on the same N units: a shared unit effect (the units' correlation) plus each model's own noise,
    exchangeable between the models; `effect` is added to every loss of the second model."""
    shared = rng.normal(0.0, unit_sd, N)
    models = []
    for shift in (0.0, effect):
        models.append([sequence_sums(rng, T, codebooks=1, unit_effect=shared[u] + shift + rng.normal(0, model_sd),
                                     sd=0.2) for u in range(N)])
    return models


def _run(models, B=199, seed=0, labels=("base", "new")):
    samples = [ModelSample(label, seqs.__getitem__, compute_metrics(pooled(seqs), context=CONTEXT, window=WINDOW))
               for label, seqs in zip(labels, models, strict=True)]
    return analyse(samples, N, B=B, seed=seed)


def _loss_test(found):
    return next(c for c in found.comparisons if c["metric"] == "loss_combined")


def test_under_the_null_the_interval_covers_zero_and_p_is_calibrated():
    rng = np.random.default_rng(0)
    tests = [_loss_test(_run(_dataset(rng), seed=i)) for i in range(200)]
    covers = np.mean([t["ci95"][0] <= 0.0 <= t["ci95"][1] for t in tests])
    rejects = np.mean([t["p_value"] < 0.05 for t in tests])
    assert 0.90 <= covers <= 0.99, covers
    assert rejects <= 0.10, rejects


def test_a_planted_effect_is_found_with_its_sign():
    rng = np.random.default_rng(1)
    tests = [_loss_test(_run(_dataset(rng, effect=-0.5), seed=i)) for i in range(40)]
    assert np.mean([t["p_value"] < 0.05 for t in tests]) >= 0.8
    assert np.mean([t["delta"] < 0 and t["ci95"][1] < 0 for t in tests]) >= 0.8
    assert np.mean([t["wins"] > t["n_units"] / 2 for t in tests]) >= 0.8  # most units improve


def test_pairing_narrows_the_interval_when_units_are_correlated():
    rng = np.random.default_rng(2)
    models = _dataset(rng, unit_sd=1.0, model_sd=0.1)
    units = [build_units(m.__getitem__, N, context=CONTEXT, window=WINDOW) for m in models]
    plan = Plan.make(T, window=WINDOW, context=CONTEXT)
    shared = resample_matrix(N, 999, 0)
    paired = [statistics(u, shared, plan)["loss_combined"] for u in units]
    unpaired = [statistics(u, resample_matrix(N, 999, seed), plan)["loss_combined"]
                for u, seed in zip(units, (1, 2), strict=True)]
    width = [np.diff(np.percentile(d[1] - d[0], [2.5, 97.5]))[0] for d in (paired, unpaired)]
    assert width[0] < width[1] / 3


def test_the_same_model_under_two_labels_differs_by_exactly_zero_with_p_one():
    rng = np.random.default_rng(3)
    base = _dataset(rng)[0]
    found = _run([base, base])
    assert len(found.comparisons) > 5
    for c in found.comparisons:
        if c["delta"] is None:
            continue
        assert c["delta"] == 0.0 and c["p_value"] == 1.0 and c["ci95"] == [0.0, 0.0], c
        assert c["wins"] == 0


def test_units_without_a_value_for_either_model_are_left_out_and_counted():
    result = paired_test(1.0, 2.0, np.array([1.0, 1.1, np.nan]), np.array([2.0, 2.1, 2.0]),
                         np.array([0.5, np.nan, 3.0, 1.0]), np.array([1.0, 1.0, 2.0, np.nan]))
    assert result["n_units"] == 2 and result["n_units_left_out"] == 2 and result["wins"] == 1
    assert result["delta"] == -1.0 and result["ci95"] == pytest.approx([-1.0, -1.0])
