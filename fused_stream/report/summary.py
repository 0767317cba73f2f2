"""The stdout summary: a fixed-width text table, one column per model, of the numbers a reader looks at first.

Absent or non-finite values show as "—" rather than failing or printing "nan": a run without text, without a
24k-frame window or without memory samples still gets its table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .model_run import ModelRun

_DASH = "—"  # the table's "not available" cell


def summary_table(runs: list[ModelRun]) -> str:
    """A fixed-width text table, one column per model, for stdout. Absent or non-finite values show as "—"."""
    has_text = any("text" in (run.metrics.get("overall") or {}) for run in runs)
    rows: list[tuple[str, Callable[[ModelRun], str]]] = [
        ("frames", lambda r: _fmt(r.metrics.get("frames"), "{:,}")),
        ("sequences", lambda r: _fmt(r.metrics.get("n_sequences"), "{:,}")),
        ("loss combined", lambda r: _fmt((r.metrics.get("overall") or {}).get("combined"), "{:.4f}")),
    ]
    if has_text:
        rows.append(("loss text", lambda r: _fmt((r.metrics.get("overall") or {}).get("text"), "{:.4f}")))
    for key in ("librilight_loss_8k", "librilight_loss_16k", "librilight_loss_24k"):
        rows.append((key, lambda r, key=key: _fmt((r.metrics.get("flat") or {}).get(key), "{:.4f}")))
    rows += [
        ("librilight_slope", lambda r: _fmt((r.metrics.get("flat") or {}).get("librilight_slope"), "{:+.5f}")),
        ("frames/s", lambda r: _fmt(r.driver_report.get("frames_per_second"), "{:,.1f}")),
        ("peak memory", lambda r: _bytes((r.driver_report.get("memory") or {}).get("peak_bytes"))),
        ("constant memory", lambda r: _verdict((r.driver_report.get("memory") or {}).get("constant_memory"))),
    ]
    header = [""] + [run.label for run in runs]
    body = [[name] + [cell(run) for run in runs] for name, cell in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in body])


def _fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return _DASH
    if not math.isfinite(value):
        return _DASH
    return spec.format(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        return _DASH
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _verdict(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "NO (grows)"
    return "unknown"  # None: too few samples after warm-up to judge (see monitor.constant_memory_check)
