"""The progress bar (or callback) of a streaming run: host-side counts only, never a device value.

While the bar is open, log records and Python warnings are written through it (tqdm's `logging_redirect_tqdm`,
`tqdm.write`), on lines of their own above the bar instead of glued to it.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator

from .monitor import Monitor

ProgressFn = Callable[[int, int], None]  # (calls done, total calls), called from the host-side step count


class Progress:
    """Host-side step counter driving a tqdm bar (with frames/s and memory from the monitor) or a callback.

    Never touches device values: frames and memory come from the monitor's host-side count and its sampler thread.
    """

    def __init__(self, progress: bool | ProgressFn, total: int) -> None:
        self.done, self.total = 0, total
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.monitor: Monitor | None = None
        self._redirect = contextlib.ExitStack()
        # The rate shown: frames over the time since the first step, not since the bar opened (verification, graph
        # capture and warm-up come before it), then smoothed over the last windows as tqdm smooths its own.
        self._first: tuple[float, int] | None = None  # (time, frames) at the first step
        self._last: tuple[float, int] | None = None  # (time, frames) at the last postfix
        self.rate: float | None = None  # frames/s shown, None before there is one
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", desc="streaming")
            self._redirect.enter_context(through_bar())

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.monitor is not None:
                self._show_rate()
        if self.callback is not None:
            self.callback(self.done, self.total)

    def _show_rate(self) -> None:
        now = time.perf_counter()
        frames, memory = self.monitor.latest()
        if self._first is None:
            self._first = self._last = (now, frames)
            return
        if now - self._last[0] <= 0.5:  # a postfix per step would cost more than it shows
            return
        window = (frames - self._last[1]) / (now - self._last[0])
        self.rate = window if self.rate is None else SMOOTHING * window + (1 - SMOOTHING) * self.rate
        self._last = (now, frames)
        self.bar.set_postfix_str(f"{self.rate:,.0f} frames/s, mem {mib(memory)}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()


SMOOTHING = 0.3  # tqdm's own default: the weight of the newest window in the rate shown


@contextlib.contextmanager
def through_bar() -> Iterator[None]:
    """Log records (of the root logger's console handlers) and Python warnings go through tqdm while it runs: each
    on a line of its own above the bar, the bar redrawn below."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    shown = warnings.showwarning

    def write(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' API
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        tqdm.write(text, file=file or sys.stderr)

    warnings.showwarning = write
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        warnings.showwarning = shown


def mib(value: int | None) -> str:
    """Bytes as MiB for humans; "n/a" when unknown."""
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"
