"""loss_curve.png: combined loss against position for every run, on one log-x axis, with the attention context.

A log axis because long-context behaviour lives in the tail: whether the loss keeps falling past the attention
context (marked) is what the plot is for. matplotlib is imported only when a plot is drawn, so the rest of the
package does not need it.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

from .model_run import ModelRun, check_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_loss_curves(runs: list[ModelRun]) -> Figure:
    """Combined loss vs position for every run on one log-x axis: raw per-position line, window means, context.

    The figure is built without pyplot and drawn by an explicit Agg canvas: that is headless by construction and,
    unlike `matplotlib.use("Agg")`, does not switch the backend of a notebook or GUI session that imported us.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_runs(runs)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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
    ax.set_xlabel("frame position (12.5 frames/s, log scale)")
    ax.set_ylabel("combined teacher-forced cross-entropy (nats)")
    ax.set_title(f"Loss vs position ({_sequences_text(runs)})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best", fontsize="small")
    return fig


def loss_curve_png(runs: list[ModelRun]) -> bytes:
    """The content of loss_curve.png: `plot_loss_curves(runs)` rendered at 120 dpi."""
    buf = io.BytesIO()
    plot_loss_curves(runs).savefig(buf, format="png", dpi=120)
    return buf.getvalue()


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
