"""report/per_sequence.py: dict rows to CSV, columns in first-named order, missing values empty, floats exact."""

from __future__ import annotations

import csv
import io
import math

from fused_stream.report.per_sequence import rows_csv


def test_rows_csv_columns_cells_and_exact_floats():
    third = 1 / 3
    rows = [{"model": "a", "loss": third, "source": "x.flac;y.flac"},
            {"model": "b, quoted", "slope": None, "loss": math.nan, "frames": 12}]
    text = rows_csv(rows)
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["model", "loss", "source", "slope", "frames"]  # every key, in the order rows first name it
    assert parsed[1] == ["a", repr(third), "x.flac;y.flac", "", ""]  # absent keys are empty cells
    assert parsed[2] == ["b, quoted", "", "", "", "12"]  # None and NaN are empty; a comma is quoted, not split
    assert float(parsed[1][1]) == third  # repr round-trips: the exact float64
    assert text.endswith("\n") and "\r" not in text
    assert rows_csv([]) == "\n"
