"""The cluster bootstrap: one seeded matrix of resampled units, and every headline statistic recomputed per resample.

`resample_matrix(N, B, seed)` draws B resamples of N units with replacement (numpy's PCG64 seeded with `seed`,
like sacrebleu's `rng.choice(N, (B, N))`) and returns how often each unit is drawn, [B, N]. The same matrix serves
every model and every metric of a run, so two models' resamples are paired unit for unit.

`statistics(units, W, plan)` recomputes, for each row of W, the statistics `metrics.compute_metrics` reports, by
the keys the rest of the package uses:
- `loss_{stream}`, `loss_combined`, `loss_weighted`: pooled losses (sum of sums / sum of counts);
- `window_{start}_{end}`: the mean of the `combined` curve over a tiled window (the flat keys' windows and slopes:
  of the curve the flat keys follow, `weighted` with codebook weights);
- `librilight_loss_{n}k`: the same over its centered window;
- `slope_{all,before_context,after_context}` and `librilight_slope*`: least-squares slope of those window means
  against ln(window center), over the windows with a value (at least 2), the windows `metrics.slope_windows` picks;
- `per_unit_{slope key}`: the per-unit slope estimator, the mean over units of each unit's own slope (units without
  one left out), which does not shift when short files drop out of the later windows, as the pooled curve does.
Resamples are processed in chunks of rows so that the [chunk, T] curves stay near `chunk_bytes`.

`summarize` turns replicates into a standard error (their standard deviation) and a percentile 95 % interval
(the sorted replicates at B//40 and B - B//40 - 1, as sacrebleu); a replicate with no value (e.g. a window that a
resample does not cover) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import FLAT_SLOPE_KEYS, flat_curve, flat_loss_windows, slope_windows, window_bounds
from .paired import percentile_interval

__all__ = ["Plan", "resample_matrix", "statistics", "point_values", "unit_values", "summarize", "window_key"]


def window_key(start: int, end: int) -> str:
    return f"window_{start}_{end}"


def resample_matrix(n_units: int, B: int, seed: int) -> np.ndarray:
    """[B, n_units] float64: how many times each resample draws each unit (rows sum to n_units)."""
    if n_units < 1 or B < 1:
        raise ValueError(f"resample_matrix needs n_units >= 1 and B >= 1, got {n_units} and {B}")
    draws = np.random.default_rng(seed).integers(0, n_units, size=(B, n_units))
    flat = (draws + n_units * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n_units).reshape(B, n_units).astype(np.float64)


@dataclass(frozen=True)
class Plan:
    """Which segments and slopes a model's statistics cover: `compute_metrics`' definitions for T, window, context."""

    windows: list[tuple[int, int]]
    flat_windows: dict[str, tuple[int, int]]
    slopes: dict[str, list[int]]  # statistic key -> indices into `windows`

    @classmethod
    def make(cls, frames: int, *, window: int, context: int) -> Plan:
        bounds = window_bounds(frames, window)
        chosen = slope_windows(bounds, context, frames)
        slopes = {(key if key in FLAT_SLOPE_KEYS else f"slope_{key}"): idx for key, idx in chosen.items()}
        return cls(bounds, flat_loss_windows(frames, window), slopes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _curves(units: Any, W: np.ndarray) -> dict[str, np.ndarray]:
    """Per-resample `combined` (and `weighted`) curves, [b, T]; NaN where a resample has nothing."""
    K = len(units.audio)
    count = W @ units.count
    curves = {"combined": _ratio(W @ units.audio_sum, K * count)}
    w = units.codebook_weights
    if w is not None:
        curves["weighted"] = _ratio(W @ units.weighted_sum, w.sum() * count)
    if len(units.irregular):
        P = len(units.irregular)
        sums = (W @ units.irr_sum.reshape(len(W[0]), -1)).reshape(-1, K, P)  # [b, K, P]
        counts = (W @ units.irr_count.reshape(len(W[0]), -1)).reshape(-1, K, P)
        means, has = _ratio(sums, counts), counts > 0
        filled = np.where(has, means, 0.0)
        curves["combined"][:, units.irregular] = _ratio(filled.sum(axis=1), has.sum(axis=1).astype(np.float64))
        if w is not None:
            wk = w[None, :, None] * has
            curves["weighted"][:, units.irregular] = _ratio((wk * filled).sum(axis=1), wk.sum(axis=1))
    return curves


def _segment_means(curve: np.ndarray, segments: list[tuple[int, int]]) -> np.ndarray:
    """[b, len(segments)]: the mean over each segment of the positions with a value (NaN if none)."""
    ok = np.isfinite(curve)
    total = np.concatenate([np.zeros((len(curve), 1)), np.cumsum(np.where(ok, curve, 0.0), axis=1)], axis=1)
    n = np.concatenate([np.zeros((len(curve), 1)), np.cumsum(ok, axis=1, dtype=np.float64)], axis=1)
    a = np.asarray([s for s, _ in segments], dtype=np.int64)
    e = np.asarray([t for _, t in segments], dtype=np.int64)
    return _ratio(total[:, e] - total[:, a], n[:, e] - n[:, a])


def log_slopes(centers: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`metrics.log_slope` for many rows at once: [b, n] values -> [b] slopes over each row's finite values (NaN
    with fewer than 2)."""
    x = np.log(np.asarray(centers, dtype=np.float64))[None, :]
    ok = np.isfinite(values)
    n = ok.sum(axis=1)
    y = np.where(ok, values, 0.0)
    xm = _ratio((ok * x).sum(axis=1), n.astype(np.float64))[:, None]
    ym = _ratio(y.sum(axis=1), n.astype(np.float64))[:, None]
    dx = np.where(ok, x - xm, 0.0)
    out = _ratio((dx * (y - ym)).sum(axis=1), (dx * dx).sum(axis=1))
    out[n < 2] = np.nan
    return out


def statistics(units: Any, W: np.ndarray, plan: Plan, *, chunk_bytes: int = 32 << 20) -> dict[str, np.ndarray]:
    """Every statistic (module docstring) for each row of W [B, N]: {key: [B] float64}, NaN where undefined."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != units.n_units:
        raise ValueError(f"W must be [B, {units.n_units}], got {W.shape}")
    out: dict[str, np.ndarray] = {}
    S, C = W @ units.totals_sum, W @ units.totals_count
    audio = units.audio
    for i, name in enumerate(units.names):
        out[f"loss_{name}"] = _ratio(S[:, i], C[:, i])
    out["loss_combined"] = _ratio(S[:, audio].sum(axis=1), C[:, audio].sum(axis=1))
    if units.codebook_weights is not None:
        w = units.codebook_weights
        out["loss_weighted"] = _ratio((S[:, audio] * w).sum(axis=1), (C[:, audio] * w).sum(axis=1))
    # Windows are reported on `combined`; the flat keys (their windows and slopes) on the curve they follow,
    # `weighted` when codebook weights are set (metrics.flat_curve).
    flat = flat_curve(units.codebook_weights is not None)
    segments = list(plan.windows) + list(plan.flat_windows.values())
    rows = max(1, chunk_bytes // (8 * max(1, units.frames)))
    parts = []
    for i in range(0, len(W), rows):
        curves = _curves(units, W[i:i + rows])
        parts.append((_segment_means(curves["combined"], list(plan.windows)), _segment_means(curves[flat], segments)))
    nw = len(plan.windows)
    means = np.concatenate([p[0] for p in parts]) if parts and nw else np.zeros((len(W), nw))
    flat_means = np.concatenate([p[1] for p in parts]) if parts and segments else np.zeros((len(W), len(segments)))
    for j, (a, b) in enumerate(plan.windows):
        out[window_key(a, b)] = means[:, j]
    for j, key in enumerate(plan.flat_windows):
        out[key] = flat_means[:, nw + j]
    centers = np.asarray([(a + b) / 2 for a, b in plan.windows], dtype=np.float64)
    for key, idx in plan.slopes.items():
        chosen = flat_means if key in FLAT_SLOPE_KEYS else means
        out[key] = log_slopes(centers[idx], chosen[:, idx]) if len(idx) >= 2 else np.full(len(W), np.nan)
    for key, slopes in units.unit_slopes.items():
        has = np.isfinite(slopes)
        out[f"per_unit_{key}"] = _ratio(W @ np.where(has, slopes, 0.0), W @ has.astype(np.float64))
    return out


def unit_values(units: Any, plan: Plan) -> dict[str, np.ndarray]:
    """Each unit's own value of every statistic, {key: [N]}: the statistic on that unit alone, and for slopes the
    unit's own slope as `compute_metrics` gives it on the unit alone (its own windows)."""
    N, parts = units.n_units, []
    for start in range(0, N, 256):  # rows of the identity in blocks: an [N, N] matrix of 10,000 files is 800 MB
        rows = np.zeros((min(256, N - start), N))
        rows[np.arange(len(rows)), start + np.arange(len(rows))] = 1.0
        parts.append(statistics(units, rows, plan))
    values = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    for key, slopes in units.unit_slopes.items():
        values[key] = slopes
        values[f"per_unit_{key}"] = slopes
    return values


def point_values(metrics: dict[str, Any], units: Any, plan: Plan) -> dict[str, float]:
    """The reported value of every statistic key, read from `compute_metrics`' dict (NaN where it has none), and
    the per-unit slope estimator's mean over units."""
    nan = math.nan

    def number(value: Any) -> float:
        return nan if value is None else float(value)

    out = {f"loss_{k}": number(v) for k, v in metrics["overall"].items()}
    for name in units.names:
        out.setdefault(f"loss_{name}", nan)
    by_bounds = {(w["start"], w["end"]): w for w in metrics["windows"]}
    for a, b in plan.windows:
        out[window_key(a, b)] = number((by_bounds.get((a, b)) or {}).get("combined"))
    for key in plan.flat_windows:
        out[key] = number(metrics["flat"].get(key))
    for key in plan.slopes:
        out[key] = number(metrics["flat"].get(key) if key in FLAT_SLOPE_KEYS
                          else metrics["slopes"].get(key.removeprefix("slope_")))
    for key, slopes in units.unit_slopes.items():
        has = np.isfinite(slopes)
        out[f"per_unit_{key}"] = float(slopes[has].mean()) if has.any() else nan
    return out


def summarize(point: float, replicates: np.ndarray) -> dict[str, Any]:
    """{"value", "stderr", "ci95": [low, high]} of one statistic (None where it has no value or too few resamples)."""
    finite = replicates[np.isfinite(replicates)]
    interval = percentile_interval(replicates)
    if math.isnan(point) or interval is None:
        return {"value": None if math.isnan(point) else point, "stderr": None, "ci95": None}
    return {"value": point, "stderr": float(finite.std(ddof=1)), "ci95": list(interval)}
