"""Units of evidence: the per-unit arrays a bootstrap resamples, built from each unit's PositionSums.

A unit is a file, a book or a speaker (`--cluster`); the sequences of one unit are added into one PositionSums
before they get here. Frames within a unit are correlated, so units, never frames, are what a resample draws.

What a resample recomputes is the statistic `metrics.compute_metrics` reports: a window mean is the mean over
positions of the per-position `combined` curve, and `combined` at a position is the mean over audio codebooks of
(sum of losses / count). For a resample that draws unit u `W[b, u]` times, the per-position sums and counts are
`W @ unit_sums` and `W @ unit_counts`, which gives exactly that statistic. Keeping [N, codebooks, T] per model would
cost hundreds of MB at 200 units x 25,000 frames, so the arrays are reduced first:

- at a *regular* position every unit's audio codebooks share one count (a codebook is scored at a frame of a
  sequence or it is not, alike for all of them), so every resample's counts are equal across codebooks there and
  combined = (sum over codebooks of the sums) / (codebooks x count): one [N, T] array of codebook-summed sums and
  one of counts suffice;
- the few *irregular* positions (the acoustic delay leaves a sequence's last frame scored for some codebooks only)
  keep their per-codebook sums and counts, [N, K, P].

`build_units` reads every unit twice (the first pass finds T and the irregular positions), one unit in memory at a
time. Each unit's own slopes (as `compute_metrics` gives them on the unit alone) are kept for the per-unit slope
estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..metrics import (
    FLAT_SLOPE_KEYS,
    TEXT,
    PositionSums,
    flat_curve,
    log_slope,
    position_means,
    slope_windows,
    window_means,
)

__all__ = ["CLUSTERS", "UnitArrays", "build_units", "own_slopes", "unit_slope_keys"]

CLUSTERS = ("file", "book", "speaker")  # what a unit can be (`--cluster`)


@dataclass
class UnitArrays:
    """One model's data as N units, reduced to what a resample needs (see the module docstring)."""

    names: list[str]  # stream names of the PositionSums
    frames: int  # T, the longest unit
    totals_sum: np.ndarray  # [N, S] float64: each unit's sum of valid losses per stream
    totals_count: np.ndarray  # [N, S] float64: their count
    audio_sum: np.ndarray  # [N, T] float64: sum over audio codebooks of the sums (0 at irregular positions)
    count: np.ndarray  # [N, T] float64: the count the audio codebooks share (0 at irregular positions)
    weighted_sum: np.ndarray | None  # [N, T]: sum over codebooks of w_k * sums (with codebook weights)
    irregular: np.ndarray  # [P] int64 positions where some unit's audio codebooks have different counts
    irr_sum: np.ndarray  # [N, K, P] float64 per-codebook sums there
    irr_count: np.ndarray  # [N, K, P] float64 per-codebook counts there
    codebook_weights: np.ndarray | None  # [K]
    unit_slopes: dict[str, np.ndarray]  # slope key -> [N]: each unit's own slope (compute_metrics alone); NaN: none

    @property
    def n_units(self) -> int:
        return int(self.totals_sum.shape[0])

    @property
    def audio(self) -> list[int]:
        return [i for i, name in enumerate(self.names) if name != TEXT]


def unit_slope_keys(metrics: dict) -> dict[str, float | None]:
    """The slopes of one `compute_metrics` dict by the keys the statistics use: `slope_{all,before_context,
    after_context}` and the flat `librilight_slope*` keys (None where the metrics have none)."""
    out: dict[str, float | None] = {f"slope_{k}": v for k, v in metrics["slopes"].items()}
    for key in FLAT_SLOPE_KEYS:
        out[key] = metrics["flat"].get(key)
    return out


def own_slopes(sums: PositionSums, *, context: int, window: int,
               codebook_weights: Sequence[float] | None = None) -> dict[str, float | None]:
    """The slopes `compute_metrics(sums)` reports, by `unit_slope_keys`' names, without its other numbers: the
    unit's own tiling and window means (`metrics.window_means`), the windows `metrics.slope_windows` picks, at
    least 2 with a value, `metrics.log_slope` over them (the flat slope keys over the curve they follow)."""
    curves = position_means(sums, codebook_weights)
    flat = flat_curve(codebook_weights is not None)
    windows = window_means(curves["combined"], window)
    centers = np.asarray([(a + b) / 2 for a, b, _ in windows])
    by_curve = {"combined": np.asarray([m for _, _, m in windows]),
                flat: np.asarray([m for _, _, m in window_means(curves[flat], window)])}
    out: dict[str, float | None] = {}
    for key, idx in slope_windows([(a, b) for a, b, _ in windows], context, sums.frames).items():
        means = by_curve[flat if key in FLAT_SLOPE_KEYS else "combined"]
        finite = [i for i in idx if not math.isnan(means[i])]
        name = key if key in FLAT_SLOPE_KEYS else f"slope_{key}"
        out[name] = log_slope(centers[finite], means[finite]) if len(finite) >= 2 else None
    return out


def build_units(
    load_unit: Callable[[int], PositionSums], n_units: int, *, context: int, window: int,
    codebook_weights: Sequence[float] | None = None,
) -> UnitArrays:
    """The arrays of `n_units` units, `load_unit(u)` giving unit u's PositionSums (called twice per unit)."""
    if n_units < 1:
        raise ValueError("build_units needs at least one unit")
    names: list[str] | None = None
    T = 0
    irregular = np.zeros(0, dtype=bool)
    for u in range(n_units):  # pass 1: the length and the irregular positions
        sums = load_unit(u)
        names = names or list(sums.names)
        if list(sums.names) != names:
            raise ValueError(f"unit {u} has streams {sums.names}, unit 0 {names}: one model's units must agree")
        audio = [i for i, name in enumerate(names) if name != TEXT]
        c = sums.counts[audio].numpy()
        odd = (c.min(axis=0) != c.max(axis=0)) if c.shape[1] else np.zeros(0, dtype=bool)
        T = max(T, sums.frames)
        if len(irregular) < T:
            irregular = np.pad(irregular, (0, T - len(irregular)))
        irregular[: len(odd)] |= odd
    assert names is not None
    audio = [i for i, name in enumerate(names) if name != TEXT]
    K, S, P = len(audio), len(names), int(irregular.sum())
    positions = np.flatnonzero(irregular)
    w = None if codebook_weights is None else np.asarray(list(codebook_weights), dtype=np.float64)
    if w is not None and len(w) != K:
        raise ValueError(f"codebook_weights needs one weight per audio codebook ({K}), got {len(w)}")
    arrays = UnitArrays(
        names=names, frames=T, totals_sum=np.zeros((n_units, S)), totals_count=np.zeros((n_units, S)),
        audio_sum=np.zeros((n_units, T)), count=np.zeros((n_units, T)),
        weighted_sum=None if w is None else np.zeros((n_units, T)), irregular=positions,
        irr_sum=np.zeros((n_units, K, P)), irr_count=np.zeros((n_units, K, P)), codebook_weights=w, unit_slopes={},
    )
    slopes: dict[str, list[float]] = {}
    for u in range(n_units):  # pass 2: the arrays, and each unit's own slopes
        sums = load_unit(u)
        s, c = sums.sums.numpy(), sums.counts.numpy().astype(np.float64)
        Tu = sums.frames
        arrays.totals_sum[u], arrays.totals_count[u] = s.sum(axis=1), c.sum(axis=1)
        arrays.audio_sum[u, :Tu] = s[audio].sum(axis=0)
        arrays.count[u, :Tu] = c[audio[0]]
        if w is not None:
            arrays.weighted_sum[u, :Tu] = (w[:, None] * s[audio]).sum(axis=0)
        inside = positions[positions < Tu]
        arrays.irr_sum[u][:, : len(inside)] = s[audio][:, inside]
        arrays.irr_count[u][:, : len(inside)] = c[audio][:, inside]
        for key, value in own_slopes(sums, context=context, window=window,
                                     codebook_weights=codebook_weights).items():
            slopes.setdefault(key, []).append(math.nan if value is None else value)
    arrays.audio_sum[:, positions] = 0.0  # irregular positions are computed from the per-codebook arrays only
    arrays.count[:, positions] = 0.0
    if arrays.weighted_sum is not None:
        arrays.weighted_sum[:, positions] = 0.0
    arrays.unit_slopes = {key: np.asarray(values, dtype=np.float64) for key, values in slopes.items()}
    return arrays
