"""per_sequence.csv and per_window.csv: the run's numbers per (model, sequence), in files that load into pandas.

per_sequence.csv has one row per (model, sequence): model, sequence, index, source (the files, `;`-joined),
speaker, book, unit (what the bootstrap resampled), frames, codes_sha256, the sequence's own overall losses
(`loss_{stream}`, `loss_combined`, ...), its `librilight_*` keys and its slopes (`slope_all`, ...), each as
`metrics.compute_metrics` gives them on that sequence alone. per_window.csv is long: model, sequence, start, end,
stream, mean, count. A value that does not exist is an empty cell; floats are written as their `repr` (exact).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """A CSV of dict rows; the columns are every key in the order rows first name them."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buf.getvalue()
