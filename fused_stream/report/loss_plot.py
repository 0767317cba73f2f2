"""loss_curve.png: combined loss against position for every run, on one log-x axis, with the attention context.

A log axis because long-context behaviour lives in the tail: whether the loss keeps falling past the attention
context (marked) is what the plot is for. matplotlib is imported only when a plot is drawn, so the rest of the
package does not need it.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from .model_run import ModelRun, check_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_loss_curves(runs: list[ModelRun], comparisons: list[dict[str, Any]] | None = None) -> Figure:
    """Combined loss vs position for every run on one log-x axis: raw per-position line, window means, context.

    The figure is built without pyplot and drawn by an explicit Agg canvas: that is headless by construction and,
    unlike `matplotlib.use("Agg")`, does not switch the backend of a notebook or GUI session that imported us.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_runs(runs)
    deltas = _window_deltas(comparisons or [])
    fig = Figure(figsize=(10, 8.5 if deltas else 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    if deltas:
        ax, dax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, dax = fig.add_subplot(), None
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        y = np.asarray(run.curves["combined"], dtype=np.float64)
        # position 0 has no place on a log axis (log 0 = -inf): the raw curve starts at position 1
        x = np.arange(len(y))
        ax.plot(x[1:], y[1:], color=color, linewidth=0.6, alpha=0.45, label=run.label)
        centers, means = _window_points(run)
        if centers:
            ax.plot(centers, means, color=color, linewidth=2.0, marker="o", markersize=4,
                    label=f"{run.label} (window means)")
        band = _window_band(run)
        if band[0]:
            ax.fill_between(band[0], band[1], band[2], color=color, alpha=0.2, linewidth=0,
                            label=f"{run.label}: 95 % interval (bootstrap over units)")
    contexts = [run.context for run in runs]
    if len(set(contexts)) == 1:
        ax.axvline(contexts[0], color="0.3", linestyle="--", linewidth=1.0,
                   label=f"attention context ({contexts[0]} frames)")
    else:
        for run, color in zip(runs, colors, strict=True):
            ax.axvline(run.context, color=color, linestyle="--", linewidth=1.0,
                       label=f"{run.label}: attention context ({run.context} frames)")
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, max(run.length() for run in runs), max(contexts) * 1.1))
    if dax is not None:
        _delta_panel(dax, runs, deltas, dict(zip([r.label for r in runs], colors, strict=True)))
    (dax or ax).set_xlabel("frame position (12.5 frames/s, log scale)")
    ax.set_ylabel("combined teacher-forced cross-entropy (nats)")
    ax.set_title(f"Loss vs position ({_sequences_text(runs)})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best", fontsize="small")
    return fig


def loss_curve_png(runs: list[ModelRun], comparisons: list[dict[str, Any]] | None = None) -> bytes:
    """The content of loss_curve.png: `plot_loss_curves(runs, comparisons)` rendered at 120 dpi."""
    buf = io.BytesIO()
    figure = plot_loss_curves(runs) if comparisons is None else plot_loss_curves(runs, comparisons)
    figure.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


_WINDOW = re.compile(r"window_(\d+)_(\d+)")


def _window_deltas(comparisons: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float, float]]]:
    """model -> [(center, delta, low, high)] of its window comparisons with the baseline that have an interval."""
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for c in comparisons:
        match = _WINDOW.fullmatch(str(c.get("metric")))
        if match and c.get("delta") is not None and c.get("ci95"):
            center = (int(match[1]) + int(match[2])) / 2
            if center > 0:
                out.setdefault(c["model"], []).append((center, c["delta"], c["ci95"][0], c["ci95"][1]))
    return {model: sorted(points) for model, points in out.items()}


def _delta_panel(ax: Any, runs: list[ModelRun], deltas: dict[str, list], colors: dict[str, str]) -> None:
    """Each model's window-mean difference from the baseline with its paired 95 % band, and (right axis) how many
    units cover each window: where the curves separate, and where the data thin out."""
    for model, points in deltas.items():
        x, d, lo, hi = (np.asarray(v) for v in zip(*points, strict=True))
        color = colors.get(model, "C0")
        ax.plot(x, d, color=color, marker="o", markersize=3, linewidth=1.5, label=f"{model} - baseline")
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_ylabel("Δ window mean (nats), 95 % paired band")
    ax.grid(True, which="both", alpha=0.25)
    baseline = next((run for run in runs if run.label not in deltas), runs[0])
    covered = [(w["center"], w["units"]) for w in (baseline.metrics.get("windows") or [])
               if w.get("units") is not None and w.get("center", 0) > 0]
    if covered:
        twin = ax.twinx()
        twin.step([c for c, _ in covered], [u for _, u in covered], where="mid", color="0.5", linewidth=1.0,
                  linestyle=":", label="units covering the window")
        twin.set_ylabel("units covering the window", color="0.4")
        twin.set_ylim(0, max(u for _, u in covered) * 1.1 + 1)
        twin.legend(loc="lower right", fontsize="small")
    ax.legend(loc="upper right", fontsize="small")


def _window_band(run: ModelRun) -> tuple[list[float], list[float], list[float]]:
    """(center, low, high) of the run's windows that have a 95 % interval (from the bootstrap)."""
    points = []
    for window in run.metrics.get("windows") or []:
        center, ci = window.get("center"), window.get("combined_ci95")
        if center is not None and center > 0 and ci and all(v is not None and math.isfinite(v) for v in ci):
            points.append((float(center), float(ci[0]), float(ci[1])))
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _window_points(run: ModelRun) -> tuple[list[float], list[float]]:
    """(center, combined) of the run's windows with a finite mean and a positive center (log axis)."""
    points = []
    for window in run.metrics.get("windows") or []:
        center, value = window.get("center"), window.get("combined")
        if center is not None and value is not None and center > 0 and math.isfinite(value):
            points.append((float(center), float(value)))
    return [c for c, _ in points], [v for _, v in points]


def _sequences_text(runs: list[ModelRun]) -> str:
    counts = [run.metrics.get("n_sequences") for run in runs]
    if len(set(counts)) == 1:
        return f"{counts[0]} sequences"
    return ", ".join(f"{run.label}: {n} sequences" for run, n in zip(runs, counts, strict=True))
