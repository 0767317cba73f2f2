"""The paired bootstrap test of one metric, model against baseline, on the same resampled units (sacrebleu's form).

Given both models' replicates from the same resample matrix (row b draws the same units for both), the
difference of each resample, d_b = model_b - baseline_b, carries the sampling noise of the units *both* models
saw, which a comparison of two separate intervals would count twice. Then:
- delta = model - baseline (the reported values);
- ci95 = the percentile 95 % interval of d_b;
- p_value = (c + 1) / (B + 1), c = the number of resamples with |d_b - mean(d)| >= |delta|: the centred
  resamples stand for "no difference", and p is how often they look at least as far from 0 as the data do.
  Two-sided; "significant" (p < 0.05) means the models differ on this data, not that one is better;
- wins = the units where the model's own value is lower than the baseline's, of n_units units where both have a
  value; units without a value for either model are left out and counted (`n_units_left_out`).
Resamples where either model has no value (a window no drawn unit covers) are left out of d.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["paired_test", "percentile_interval"]


def percentile_interval(values: np.ndarray) -> tuple[float, float] | None:
    """sacrebleu's 95 % interval: the sorted values at B//40 and B - B//40 - 1 (None with fewer than 2)."""
    v = np.sort(values[np.isfinite(values)])
    if len(v) < 2:
        return None
    return float(v[len(v) // 40]), float(v[len(v) - len(v) // 40 - 1])


def paired_test(
    point_model: float, point_baseline: float, reps_model: np.ndarray, reps_baseline: np.ndarray,
    units_model: np.ndarray, units_baseline: np.ndarray,
) -> dict[str, Any]:
    """delta, ci95, p_value, wins, n_units, n_units_left_out of model vs baseline (module docstring)."""
    both = np.isfinite(units_model) & np.isfinite(units_baseline)
    wins = int((units_model[both] < units_baseline[both]).sum())
    base = {"wins": wins, "n_units": int(both.sum()), "n_units_left_out": int(len(both) - both.sum())}
    if math.isnan(point_model) or math.isnan(point_baseline):
        return {"delta": None, "ci95": None, "p_value": None, **base}
    delta = point_model - point_baseline
    d = reps_model - reps_baseline
    d = d[np.isfinite(d)]
    interval = percentile_interval(d)
    if interval is None:
        return {"delta": delta, "ci95": None, "p_value": None, **base}
    c = int((np.abs(d - d.mean()) >= abs(delta)).sum())
    return {"delta": delta, "ci95": list(interval), "p_value": (c + 1) / (len(d) + 1), **base}
