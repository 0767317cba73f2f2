"""report/loss_plot.py: the PNG decodes, runs share one log-x plot, the attention context is marked."""

from __future__ import annotations

import numpy as np
from report_fixtures import make_run, write

from fused_stream.report.loss_plot import plot_loss_curves


def test_png_decodes(tmp_path):
    import matplotlib.image

    image = matplotlib.image.imread(write(tmp_path, [make_run("tiny", 40)])["png"])
    assert image.shape == (660, 1200, 4)  # figsize (10, 5.5) at 120 dpi, RGBA
    assert image[..., :3].std() > 0  # something was drawn


def test_two_runs_share_one_plot():
    runs = [make_run("baseline", 50), make_run("ttt", 30, seed=1)]
    fig = plot_loss_curves(runs)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "baseline" in legend and "ttt" in legend
    assert legend.count("attention context (16 frames)") == 1  # one line when the contexts agree
    raw = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(raw["baseline"].get_xdata(), np.arange(1, 50))  # position 0 left out (log x)
    np.testing.assert_array_equal(raw["ttt"].get_ydata(), runs[1].curves["combined"][1:])
    windows = raw["ttt (window means)"]  # the all-NaN window is dropped
    assert list(windows.get_xdata()) == [7.5] and list(windows.get_ydata()) == [3.0]
    assert "2 sequences" in ax.get_title()


def test_different_contexts_get_one_line_each():
    fig = plot_loss_curves([make_run("a", 20, context=8), make_run("b", 20, context=12)])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "a: attention context (8 frames)" in legend and "b: attention context (12 frames)" in legend


def test_bands_and_a_delta_panel_with_the_units_covering_each_window():
    runs = [make_run("base", 40), make_run("ttt", 40, seed=1)]
    for run in runs:
        run.metrics["windows"][0].update(combined_ci95=[2.9, 3.1], units=5)
        run.metrics["windows"][1].update(combined_ci95=None, units=2)
    runs[1].metrics["windows"].append({"start": 30, "end": 40, "center": 35.0, "combined": 2.5,
                                       "combined_ci95": [2.4, 2.6], "units": 2})
    comparisons = [{"model": "ttt", "baseline": "base", "metric": "window_0_20", "delta": -0.1, "ci95": [-0.2, 0.0]},
                   {"model": "ttt", "baseline": "base", "metric": "window_20_40", "delta": -0.3,
                    "ci95": [-0.5, -0.1]},
                   {"model": "ttt", "baseline": "base", "metric": "loss_combined", "delta": -0.2, "ci95": [-1, 1]}]
    fig = plot_loss_curves(runs, comparisons)
    top, delta, units = fig.axes  # the curves, the Δ panel, its right axis of covering units
    bands = [c for c in top.collections if "95 %" in c.get_label()]
    assert len(bands) == 2  # one band per model, over the windows that have an interval
    lines = {line.get_label(): line for line in delta.get_lines()}
    assert list(lines["ttt - baseline"].get_xdata()) == [10.0, 30.0]
    assert list(lines["ttt - baseline"].get_ydata()) == [-0.1, -0.3]
    assert len(delta.collections) == 1  # the paired band
    (coverage,) = units.get_lines()
    assert list(coverage.get_ydata()) == [5, 2]  # the baseline's windows
    assert len(plot_loss_curves(runs).axes) == 1  # without comparisons: one panel, as before
