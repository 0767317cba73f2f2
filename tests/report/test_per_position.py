"""report/per_position.py: the CSV column scheme, and an exact round trip of every float."""

from __future__ import annotations

import numpy as np
from report_fixtures import NAN, make_run, read_csv, write


def test_csv_columns_prefixed_for_several_models_and_round_trip(tmp_path):
    runs = [make_run("baseline", 6), make_run("ttt", 4, text=False, seed=1)]
    rows = read_csv(write(tmp_path, runs)["csv"])
    curves_a = ["codebook_0", "codebook_1", "combined", "text", "count"]
    curves_b = ["codebook_0", "codebook_1", "combined", "count"]
    assert rows[0] == ["position"] + [f"baseline:{c}" for c in curves_a] + [f"ttt:{c}" for c in curves_b]
    assert len(rows) == 1 + 6  # T = the longest run
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3", "4", "5"]
    columns = [(runs[0], c) for c in curves_a] + [(runs[1], c) for c in curves_b]
    for col, (run, curve) in enumerate(columns, 1):
        label, values = run.label, run.curves[curve]
        for t in range(6):
            cell = rows[1 + t][col]
            if t >= len(values) or np.isnan(values[t]):
                assert cell == "", (label, curve, t, cell)
            elif curve == "count":
                assert cell == str(int(values[t]))  # counts stay integers
            else:
                assert abs(float(cell) - values[t]) <= 1e-12 and float(cell) == values[t], (label, curve, t)
    assert rows[1][3] == ""  # baseline:combined at position 0 is NaN
    assert rows[5][6:] == ["", "", "", ""]  # ttt has 4 positions: row of position 4 is empty for it


def test_csv_single_model_plain_names(tmp_path):
    run = make_run("tiny", 3, text=False)
    run.curves["weighted"] = np.array([1.0, NAN, 0.1])
    rows = read_csv(write(tmp_path, [run])["csv"])
    assert rows[0] == ["position", "codebook_0", "codebook_1", "combined", "weighted", "count"]
    c0, c1, comb = (run.curves[name].tolist() for name in ("codebook_0", "codebook_1", "combined"))
    expected = [
        [0, None, c1[0], None, 1.0, 0],
        [1, c0[1], c1[1], comb[1], None, 1],
        [2, c0[2], c1[2], comb[2], 0.1, 2],
    ]
    assert len(rows) == 4
    for row, want in zip(rows[1:], expected, strict=True):
        assert row[0] == str(want[0]) and row[-1] == str(want[-1])  # position and count: integers
        for cell, value in zip(row[1:-1], want[1:-1], strict=True):
            assert (cell == "") if value is None else (float(cell) == value)


def test_codebooks_ordered_numerically(tmp_path):
    run = make_run("m", 2, text=False)
    for k in range(2, 11):
        run.curves[f"codebook_{k}"] = np.zeros(2)
    header = read_csv(write(tmp_path, [run])["csv"])[0]
    assert header[1:12] == [f"codebook_{k}" for k in range(11)]
