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
