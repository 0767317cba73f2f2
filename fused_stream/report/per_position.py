"""per_position.csv: every run's per-position curves as columns, one row per position, exact to the last bit.

Columns: `position`, then for each model in order, its curves in the order codebook_0..codebook_{n-1}, combined,
weighted (if present), text (if present), any other curves (sorted), count. With a single model the column is the
curve name (`combined`); with several models it is `{label}:{curve}` (`ttt:combined`). One row per position
0..T-1, T = the longest run; NaN and positions past a shorter run's end are empty cells. Floats are written as
their `repr`, the shortest text that parses back to the same float64, so the CSV round-trips exactly.
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

import numpy as np

from .model_run import ModelRun

_CODEBOOK = re.compile(r"codebook_(\d+)")


def curve_order(curves: dict[str, np.ndarray]) -> list[str]:
    """Curve names in CSV order: codebook_0..n-1 (numerically), combined, weighted, text, others sorted, count."""
    codebooks = sorted((n for n in curves if _CODEBOOK.fullmatch(n)), key=lambda n: int(n.split("_")[1]))
    named = [n for n in ("combined", "weighted", "text") if n in curves]
    rest = sorted(set(curves) - set(codebooks) - set(named) - {"count"})
    return codebooks + named + rest + ["count"]


def _cell(value: Any) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    # repr is the shortest string that parses back to the same float64: exact round trip, no fixed digit count
    return "" if math.isnan(value) else repr(value)


def per_position_csv(runs: list[ModelRun]) -> str:
    """The content of per_position.csv (column scheme in the module docstring)."""
    prefix = len(runs) > 1
    columns: list[tuple[str, np.ndarray]] = []
    for run in runs:
        for name in curve_order(run.curves):
            columns.append((f"{run.label}:{name}" if prefix else name, np.asarray(run.curves[name])))
    T = max(run.length() for run in runs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["position"] + [name for name, _ in columns])
    for t in range(T):
        writer.writerow([t] + [_cell(values[t]) if t < len(values) else "" for _, values in columns])
    return buf.getvalue()
