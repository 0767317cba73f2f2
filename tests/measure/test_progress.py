"""measure/progress.py: the streaming bar's frames/s is the run's own rate, and log lines and warnings go through the
bar; data loading shows no empty bar for generated codes."""

from __future__ import annotations

import logging
import re
import sys
import warnings

import pytest

from fused_stream.measure import progress as progress_module
from fused_stream.measure.progress import Progress


class FakeMonitor:
    def __init__(self) -> None:
        self.frames = 0

    def latest(self) -> tuple[int, int | None]:
        return self.frames, 2**20


def test_the_rate_shown_is_the_runs_not_diluted_by_the_setup(monkeypatch):
    """100 s of setup (verification, capture, warm-up) pass between the bar opening and the first step; then every
    step takes 1 s and scores 50 frames: the bar shows 50 frames/s (frames over the time since the bar opened would
    show under 10)."""
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    bar = Progress(True, total=20)
    bar.monitor = monitor = FakeMonitor()
    clock[0] = 100.0
    for _ in range(20):
        monitor.frames += 50
        bar.advance()
        clock[0] += 1.0
    assert bar.rate == pytest.approx(50.0)
    assert "50 frames/s" in bar.bar.postfix
    bar.close()


def test_log_lines_and_warnings_get_lines_of_their_own_while_the_bar_runs(capsys):
    handler = logging.StreamHandler(sys.stderr)  # the CLI's console handler (logging.basicConfig), on captured stderr
    logging.root.addHandler(handler)
    original = warnings.showwarning
    try:
        bar = Progress(True, total=4)
        bar.advance()
        logging.getLogger("fused_stream.test").warning("a log line")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a warning", UserWarning, stacklevel=1)
        bar.advance()
        bar.close()
        assert handler in logging.root.handlers  # the console handler is back after the bar
    finally:
        logging.root.removeHandler(handler)
    err = capsys.readouterr().err
    for text in ("a log line", "UserWarning: a warning"):
        assert text in err
        assert re.search(r"(^|[\r\n])[^\r\n]*" + re.escape(text), err)
        assert not re.search(r"step/s[^\r\n]*" + re.escape(text), err)  # never on the bar's line
    assert warnings.showwarning is original  # restored when the bar closes


def test_generated_codes_show_no_loading_bar(tiny_model, tmp_path, capsys):
    from codes_fixtures import audio_codes, save_codes

    from fused_stream.data.dataset import load_dataset

    load_dataset(tiny_model, generate=2, frames=10, progress=True)
    assert "loading codes" not in capsys.readouterr().err
    save_codes(tmp_path / "a.pt", audio_codes(T=20), "pt")
    load_dataset(tiny_model, codes=tmp_path, progress=True)
    assert "loading codes" in capsys.readouterr().err
