"""The progress bar (or callback) of a streaming run: host-side counts only, never a device value."""

from __future__ import annotations

import time
from collections.abc import Callable

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
        self._shown = 0.0
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", desc="streaming")

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            now = time.perf_counter()
            if self.monitor is not None and now - self._shown > 0.5:  # a postfix per step would cost more than it shows
                self._shown = now
                frames, memory = self.monitor.latest()
                elapsed = self.bar.format_dict["elapsed"]
                rate = f"{frames / elapsed:,.0f} frames/s" if elapsed > 0 else ""
                self.bar.set_postfix_str(f"{rate}, mem {mib(memory)}", refresh=False)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def mib(value: int | None) -> str:
    """Bytes as MiB for humans; "n/a" when unknown."""
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"
