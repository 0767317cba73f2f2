"""Long-context metrics read off per-position losses: curves, window means, log-position slopes.

Everything is float64 and NaN-aware: a (sequence, stream, position) whose loss is NaN is not counted anywhere, and
a statistic with nothing to average is NaN (None in JSON, or an omitted key in `flat`) — never 0.0.

State. `PositionSums` holds, per stream and position, the float64 sum of the valid losses and their count. It is
the only thing that has to be kept from a run: partials of files, batches or processes merge with `add` (exact
float64 sums, so any merge order agrees to ~1e-12) and save with `state_dict`.

Curves (`position_means`), each of length T, NaN where nothing is valid:
- one per stream: mean over the sequences valid there;
- `combined`: unweighted mean of the audio codebook curves that have a value at that position (text never enters);
- `weighted` (with `codebook_weights`): sum_k w_k m_k / sum_k w_k over the codebooks with a value there;
- `count`: the number of sequences behind `combined`, i.e. the max over audio codebooks of their counts.

Windows. `window_means` tiles [0, T) with consecutive windows [i*w, (i+1)*w). A trailing partial window
[i*w, T) is kept only if it holds at least half a window (2 * (T - i*w) >= w): shorter ones average too few
positions to sit on the same curve. A window's mean is the mean of the per-position curve over the positions in it
that have a value, so every position weighs the same however many sequences cover it (per-position means first,
then averaged over positions). A window's center is (start + end) / 2 in frames (positions count from 0).

Slopes (`log_slope`) are least-squares slopes of window means against ln(window center), over the windows whose
mean is finite; units: loss per unit of ln(position). Fewer than 2 such windows -> None.

`compute_metrics` returns a JSON-ready dict:
- `overall`: pooled over every valid (sequence, position): sum of sums / sum of counts, per stream, `combined`
  (all audio codebooks pooled), `weighted` = sum_k w_k S_k / sum_k w_k C_k (moshi-finetune's weighted loss: each
  valid audio token weighs its codebook's weight), `text` only if any text position is valid;
- `windows`: the tiled windows above, with per-stream means, `combined`, `weighted`, `count` (sum of the `count`
  curve over the window = valid (sequence, frame) pairs behind `combined`) and `positions` (positions with a
  `combined` value);
- `first_frames`: {str(L): mean of the `combined` curve over [0, L)} for L = 512, 1024, 2048, ... while L <= T,
  and L = T; string keys so that the dict equals its own JSON round trip;
- `slopes`: `all` windows, `before_context` (windows with end <= context), `after_context` (start >= context);
- `flat`: the keys fine-tuning code logs, drop-in names, computed from window means (never single positions), of
  the `weighted` curve when codebook weights are given (the loss the model trains on), else of `combined`;
  `FLAT_DEFINITIONS` holds each key's definition beside the legacy one, and `flat_definitions` in the returned dict
  says which curve the keys follow:
  - `librilight_loss_{n}k` (n >= 1): mean of that curve over the centered window
    [n*1000 - w//2, n*1000 - w//2 + w); present only if that window lies inside [0, T) and has a value;
  - `librilight_loss_overall`: pooled over every valid (sequence, position) (`overall`'s value), whatever T;
  - `librilight_slope`: slope over the tiled windows whose centers lie in [8000, T] (legacy "8k to the end");
  - `librilight_slope_early` / `_middle` / `_late`: tiled windows with centers in [4000, 8000] / [8000, 16000] /
    [16000, 24000];
  - each slope is present only if >= 2 such windows have a finite mean; legacy code returned 0.0 or a
    single-position value there, we omit the key instead;
  - `librilight_samples`: n_sequences, always present;
  - `librilight_metrics_version`: `FLAT_VERSION`, always present: which definitions the keys follow (legacy code's
    single-position keys were version 1), so logs before and after a switch are told apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .flat_keys import FLAT_DEFINITIONS, FLAT_VERSION

__all__ = [
    "FLAT_DEFINITIONS", "FLAT_SLOPE_KEYS", "FLAT_VERSION", "PositionSums", "TEXT", "compute_metrics",
    "flat_loss_windows", "log_slope", "metrics_of", "position_means", "slope_windows", "window_bounds", "window_means",
]

TEXT = "text"  # the stream name of text losses; every other stream name is an audio codebook

# Legacy flat slope ranges, as window-center intervals in frames (inclusive on both ends).
_FLAT_SLOPE_RANGES: dict[str, tuple[float, float | None]] = {
    "librilight_slope": (8000, None),  # None: up to T
    "librilight_slope_early": (4000, 8000),
    "librilight_slope_middle": (8000, 16000),
    "librilight_slope_late": (16000, 24000),
}
FLAT_SLOPE_KEYS = tuple(_FLAT_SLOPE_RANGES)
_FLAT_STEP = 1000  # librilight_loss_{n}k is centered on n * 1000 frames



@dataclass
class PositionSums:
    """Per-position sums and counts of losses over sequences: the state that merges across batches, files, processes."""

    names: list[str]  # stream names, e.g. ["codebook_0", ..., "codebook_7", "text"]
    sums: torch.Tensor  # [S, T] float64: sum over sequences of the valid losses at (stream, position)
    counts: torch.Tensor  # [S, T] int64: number of sequences valid at (stream, position)
    n_sequences: int

    def __post_init__(self) -> None:
        if self.sums.dtype != torch.float64 or self.counts.dtype != torch.int64:
            raise ValueError(
                f"PositionSums: sums must be float64 and counts int64, got {self.sums.dtype} and {self.counts.dtype}"
            )
        if self.sums.dim() != 2 or self.sums.shape != self.counts.shape or self.sums.shape[0] != len(self.names):
            raise ValueError(
                f"PositionSums: sums {tuple(self.sums.shape)} and counts {tuple(self.counts.shape)} must both be "
                f"[S, T] with S = len(names) = {len(self.names)}"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"PositionSums: stream names must be unique, got {self.names}")

    @property
    def frames(self) -> int:
        return int(self.sums.shape[1])

    @classmethod
    def from_result(cls, result: Any) -> PositionSums:  # a core.result.EvalResult (read by attribute)
        """Sums of one result: audio codebooks `codebook_{k}` then `text`; NaN losses are not counted."""
        if result.losses.dim() != 3 or result.text_losses.dim() != 3:
            raise ValueError(
                f"EvalResult.losses / text_losses must be [B, dep_q, T] / [B, 1, T], got "
                f"{tuple(result.losses.shape)} / {tuple(result.text_losses.shape)}"
            )
        # float64 before summing: the sums must be the exact float64 sum, so merged partials agree to ~1e-12.
        losses = torch.cat([result.losses, result.text_losses], dim=1).to(torch.float64).cpu()
        valid = ~losses.isnan()
        sums = torch.where(valid, losses, torch.zeros((), dtype=torch.float64)).sum(dim=0)
        counts = valid.sum(dim=0, dtype=torch.int64)
        names = [f"codebook_{k}" for k in range(result.losses.shape[1])] + [TEXT]
        return cls(names, sums, counts, int(losses.shape[0]))

    @classmethod
    def empty(cls, names: list[str]) -> PositionSums:
        """No sequences, no frames: the neutral element of `add`."""
        S = len(names)
        return cls(list(names), torch.zeros(S, 0, dtype=torch.float64), torch.zeros(S, 0, dtype=torch.int64), 0)

    def add(self, other: PositionSums) -> PositionSums:
        """Elementwise sum; the shorter T is padded with zero sums and counts (no sequence reached there)."""
        if list(self.names) != list(other.names):
            raise ValueError(f"PositionSums.add: stream names differ: {self.names} vs {other.names}")
        T = max(self.frames, other.frames)
        sums = _pad(self.sums, T) + _pad(other.sums, T)
        counts = _pad(self.counts, T) + _pad(other.counts, T)
        return PositionSums(list(self.names), sums, counts, self.n_sequences + other.n_sequences)

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "sums": self.sums.clone(),
            "counts": self.counts.clone(),
            "n_sequences": int(self.n_sequences),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> PositionSums:
        missing = {"names", "sums", "counts", "n_sequences"} - set(d)
        if missing:
            raise ValueError(f"PositionSums state dict lacks {sorted(missing)}; was it written by state_dict()?")
        return cls(list(d["names"]), d["sums"], d["counts"], int(d["n_sequences"]))


def _pad(x: torch.Tensor, T: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.shape[1] < T else x


def _audio_indices(sums: PositionSums) -> list[int]:
    return [i for i, name in enumerate(sums.names) if name != TEXT]


def _check_weights(codebook_weights: Sequence[float] | None, n_audio: int) -> np.ndarray | None:
    if codebook_weights is None:
        return None
    w = np.asarray(list(codebook_weights), dtype=np.float64)
    if w.ndim != 1 or len(w) != n_audio:
        raise ValueError(f"codebook_weights needs one weight per audio codebook ({n_audio}), got {len(w)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"codebook_weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (without numpy's divide warnings)."""
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def position_means(sums: PositionSums, codebook_weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Per-position curves of length T (NaN where nothing is valid): per stream, `count`, `combined`, `weighted`."""
    audio = _audio_indices(sums)
    w = _check_weights(codebook_weights, len(audio))
    s = sums.sums.detach().cpu().numpy().astype(np.float64)
    c = sums.counts.detach().cpu().numpy().astype(np.int64)
    means = _ratio(s, c.astype(np.float64))
    curves: dict[str, np.ndarray] = {name: means[i] for i, name in enumerate(sums.names)}
    a_means, a_counts = means[audio], c[audio]  # [A, T]
    has = a_counts > 0
    curves["count"] = a_counts.max(axis=0) if audio else np.zeros(sums.frames, dtype=np.int64)
    filled = np.where(has, a_means, 0.0)
    curves["combined"] = _ratio(filled.sum(axis=0), has.sum(axis=0).astype(np.float64))
    if w is not None:
        wk = w[:, None] * has  # a codebook without a value at a position drops out of that position's weights
        curves["weighted"] = _ratio((wk * filled).sum(axis=0), wk.sum(axis=0))
    return curves


def _segment_mean(curve: np.ndarray, start: int, end: int) -> float:
    seg = curve[start:end]
    ok = ~np.isnan(seg)
    n = int(ok.sum())
    return float(seg[ok].sum() / n) if n else math.nan


def window_bounds(T: int, window: int) -> list[tuple[int, int]]:
    """(start, end) of the tiled windows over [0, T) (a trailing partial window kept if it holds half a window)."""
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an int >= 1 (frames), got {window!r}")
    bounds = [(i * window, (i + 1) * window) for i in range(T // window)]
    rest = T - len(bounds) * window
    if rest > 0 and 2 * rest >= window:  # keep a trailing partial window of at least half a window
        bounds.append((T - rest, T))
    return bounds


def window_means(curve: np.ndarray, window: int) -> list[tuple[int, int, float]]:
    """(start, end, mean) of each tiled window of `curve`; the mean is over positions with a value (NaN if none)."""
    curve = np.asarray(curve, dtype=np.float64)
    return [(a, b, _segment_mean(curve, a, b)) for a, b in window_bounds(len(curve), window)]


def log_slope(centers: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of `values` vs ln(`centers`) over finite values; None with fewer than 2 such points."""
    x = np.asarray(centers, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"log_slope: centers and values must be 1-D of equal length, got {x.shape} and {y.shape}")
    if np.any(x <= 0):
        raise ValueError(f"log_slope: centers must be > 0 (positions), got {x[x <= 0].tolist()}")
    ok = np.isfinite(y)
    x, y = np.log(x[ok]), y[ok]
    dx = x - x.mean() if len(x) else x
    den = float((dx * dx).sum())
    if len(x) < 2 or den == 0.0:
        return None
    return float((dx * (y - y.mean())).sum() / den)


def _json(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _pooled(sums: PositionSums, rows: list[int], w: np.ndarray | None = None) -> float:
    s = sums.sums[rows].sum(dim=1).detach().cpu().numpy()
    c = sums.counts[rows].sum(dim=1).detach().cpu().numpy().astype(np.float64)
    if w is None:
        w = np.ones(len(rows))
    den = float((w * c).sum())
    return float((w * s).sum() / den) if den > 0 else math.nan


def _windows_slope(windows: list[dict[str, Any]], key: str = "combined") -> float | None:
    chosen = [(win["center"], win[key]) for win in windows if win[key] is not None]
    if len(chosen) < 2:
        return None
    return log_slope([c for c, _ in chosen], [v for _, v in chosen])


def compute_metrics(
    sums: PositionSums,
    *,
    context: int,
    window: int = 1000,
    codebook_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All the numbers of one long-context evaluation as a JSON-ready dict (see the module docstring)."""
    if not (isinstance(context, int) and context >= 0):
        raise ValueError(f"context must be an int >= 0 (frames of attention context), got {context!r}")
    T = sums.frames
    bounds = window_bounds(T, window)
    audio = _audio_indices(sums)
    w = _check_weights(codebook_weights, len(audio))
    curves = position_means(sums, codebook_weights)
    count = curves["count"]

    overall: dict[str, float | None] = {sums.names[i]: _json(_pooled(sums, [i])) for i in audio}
    overall["combined"] = _json(_pooled(sums, audio))
    if w is not None:
        overall["weighted"] = _json(_pooled(sums, audio, w))
    if TEXT in sums.names and int(sums.counts[sums.names.index(TEXT)].sum()) > 0:
        overall["text"] = _json(_pooled(sums, [sums.names.index(TEXT)]))

    windows: list[dict[str, Any]] = []
    for a, b in bounds:
        win: dict[str, Any] = {"start": a, "end": b, "center": (a + b) / 2}
        for key in ["combined", *(["weighted"] if w is not None else []), *sums.names]:
            win[key] = _json(_segment_mean(curves[key], a, b))
        win["count"] = int(count[a:b].sum())
        win["positions"] = int((~np.isnan(curves["combined"][a:b])).sum())
        windows.append(win)

    first_frames: dict[str, float | None] = {}
    L = 512
    while L <= T:
        first_frames[str(L)] = _json(_segment_mean(curves["combined"], 0, L))
        L *= 2
    if T > 0:
        first_frames[str(T)] = _json(_segment_mean(curves["combined"], 0, T))

    chosen = slope_windows(bounds, context, T)
    slopes = {key: _windows_slope([windows[i] for i in chosen[key]]) for key in _CONTEXT_SLOPES}

    curve = flat_curve(w is not None)  # the flat keys follow the loss the model trains on
    flat = _flat_keys(curves[curve], windows, chosen, window, sums.n_sequences, curve)
    if overall.get(curve) is not None:
        flat["librilight_loss_overall"] = overall[curve]
    return {
        "n_sequences": int(sums.n_sequences),
        "frames": T,
        "window": window,
        "context": context,
        "overall": overall,
        "windows": windows,
        "first_frames": first_frames,
        "slopes": slopes,
        "flat": flat,
        "flat_definitions": {"version": FLAT_VERSION, "curve": curve,
                             "codebook_weights": None if w is None else w.tolist(), "keys": FLAT_DEFINITIONS},
    }


def flat_curve(weighted: bool) -> str:
    """The curve the flat keys are read from: "weighted" when codebook weights are set, else "combined"."""
    return "weighted" if weighted else "combined"


def metrics_of(sums: PositionSums, *, context: int, window: int, weights: Sequence[float] | None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A run's metrics and per-position curves: what the CLI writes and the drop-in returns, computed once here."""
    return (compute_metrics(sums, context=context, window=window, codebook_weights=weights),
            position_means(sums, weights))


_CONTEXT_SLOPES = ("all", "before_context", "after_context")  # the keys of compute_metrics' `slopes`


def flat_loss_windows(T: int, window: int) -> dict[str, tuple[int, int]]:
    """`librilight_loss_{n}k` -> (start, end) of its centered window, for every n whose window lies inside [0, T)."""
    out: dict[str, tuple[int, int]] = {}
    n = 1
    while n * _FLAT_STEP - window // 2 + window <= T:
        start = n * _FLAT_STEP - window // 2
        if start >= 0:  # a window wider than 2000 frames cannot be centered on 1k
            out[f"librilight_loss_{n}k"] = (start, start + window)
        n += 1
    return out


def slope_windows(bounds: list[tuple[int, int]], context: int, T: int) -> dict[str, list[int]]:
    """Indices into the tiled windows `bounds` that each slope fits over: `all`, `before_context`, `after_context`
    (compute_metrics' `slopes`) and the flat slope keys (`librilight_slope`, `_early`, ...)."""
    centers = [(a + b) / 2 for a, b in bounds]
    chosen = {
        "all": list(range(len(bounds))),
        "before_context": [i for i, (_, b) in enumerate(bounds) if b <= context],
        "after_context": [i for i, (a, _) in enumerate(bounds) if a >= context],
    }
    for key, (lo, hi) in _FLAT_SLOPE_RANGES.items():
        top = T if hi is None else hi
        chosen[key] = [i for i, c in enumerate(centers) if lo <= c <= top]
    return chosen


def _flat_keys(curve: np.ndarray, windows: list[dict[str, Any]], chosen: dict[str, list[int]], window: int,
               n_sequences: int, key: str) -> dict[str, Any]:
    """The flat keys of `curve` (`key`: its name in each window, "combined" or "weighted")."""
    flat: dict[str, Any] = {}
    for name, (start, end) in flat_loss_windows(len(curve), window).items():
        v = _segment_mean(curve, start, end)
        if not math.isnan(v):
            flat[name] = v
    for name in _FLAT_SLOPE_RANGES:
        slope = _windows_slope([windows[i] for i in chosen[name]], key)
        if slope is not None:
            flat[name] = slope
    flat["librilight_samples"] = int(n_sequences)
    flat["librilight_metrics_version"] = FLAT_VERSION
    return flat
