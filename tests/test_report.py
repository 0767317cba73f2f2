"""report.py: strict JSON, CSV column scheme and exact round trip, the PNG, atomic writes, the table, provenance."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_stream.report import document as report
from fused_stream.report.document import (
    ModelRun,
    environment_info,
    git_commit,
    plot_loss_curves,
    summary_table,
    to_jsonable,
    write_reports,
)

NAN = float("nan")


def make_run(label: str, T: int, *, context: int = 16, text: bool = True, seed: int = 0) -> ModelRun:
    rng = np.random.default_rng(seed)
    curves = {f"codebook_{k}": rng.uniform(1.0, 8.0, T) for k in range(2)}
    curves["codebook_0"][0] = NAN  # delay: nothing scored at position 0 for codebook 0
    curves["combined"] = rng.uniform(1.0, 8.0, T) / 3.0  # non-terminating binary fractions test the round trip
    curves["combined"][0] = NAN
    if text:
        curves["text"] = rng.uniform(0.5, 2.0, T)
    curves["count"] = np.arange(T, dtype=np.int64) % 3
    metrics = {
        "flat": {"librilight_loss_8k": 2.345678, "librilight_loss_16k": NAN, "librilight_slope": -0.0123456},
        "overall": {"combined": 3.14159265, "codebook_0": 2.5, "codebook_1": np.float32(1.5)}
        | ({"text": 1.25} if text else {}),
        "windows": [
            {"start": 0, "end": T // 2, "center": T / 4, "combined": 3.0},
            {"start": T // 2, "end": T, "center": 3 * T / 4, "combined": NAN},  # all-invalid window
        ],
        "n_sequences": 2,
        "frames": T * 2,
    }
    driver_report = {
        "frames_per_second": 1234.5678,
        "seconds": float("inf"),
        "memory": {"peak_bytes": 3 * 2**29, "constant_memory": True, "slope_bytes_per_frame": NAN},
        "shape": (2, 17, T),
        "scored": torch.tensor(7),
        "dtype": torch.bfloat16,
    }
    return ModelRun(label, f"preset:{label}", 1000, context, metrics, curves, driver_report)


def write(tmp_path: Path, runs: list[ModelRun]) -> dict[str, Path]:
    return write_reports(
        tmp_path / "out", runs, config={"chunk_size": 4, "limit": NAN, "lengths": (1, 2)},
        data=[{"name": "a.flac", "frames": 6, "sources": ["x"]}], seed=7,
        environment={"torch": "2.9.1", "git_commit": None},
    )


def strict_load(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"non-JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------------------------------------ results.json


def test_all_files_written_and_json_strict(tmp_path):
    runs = [make_run("baseline", 6), make_run("ttt", 4, seed=1)]
    paths = write(tmp_path, runs)
    assert set(paths) == {"json", "csv", "png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["json"].name == "results.json" and paths["csv"].name == "per_position.csv"

    doc = strict_load(paths["json"])
    assert set(doc) == {"fused_stream_version", "created", "seed", "config", "environment", "data", "failed", "models"}
    assert doc["fused_stream_version"] == "0.1.0" and doc["seed"] == 7
    assert doc["created"].endswith("+00:00")  # UTC
    assert doc["config"] == {"chunk_size": 4, "limit": None, "lengths": [1, 2]}
    assert doc["data"] == [{"name": "a.flac", "frames": 6, "sources": ["x"]}]
    assert [m["label"] for m in doc["models"]] == ["baseline", "ttt"]
    model = doc["models"][0]
    assert set(model) == {"label", "spec", "parameters", "context", "metrics", "report"}
    assert (model["spec"], model["parameters"], model["context"]) == ("preset:baseline", 1000, 16)
    assert model["metrics"]["flat"]["librilight_loss_16k"] is None  # NaN -> null
    assert model["metrics"]["overall"]["codebook_1"] == 1.5  # numpy float32 -> float
    assert model["metrics"]["windows"][1]["combined"] is None
    assert model["report"]["seconds"] is None  # inf -> null
    assert model["report"]["memory"]["slope_bytes_per_frame"] is None
    assert model["report"]["shape"] == [2, 17, 6]  # tuple -> list
    assert model["report"]["scored"] == 7 and model["report"]["dtype"] == "torch.bfloat16"


def test_default_environment_has_versions(tmp_path):
    paths = write_reports(tmp_path, [make_run("tiny", 5)], config={}, data=[], seed=0)
    env = strict_load(paths["json"])["environment"]
    assert env["torch"] == str(torch.__version__) and env["numpy"] == np.__version__
    assert env["fused_stream"] == "0.1.0" and env["moshi"].startswith("0.2.")


def test_to_jsonable_converts_nested_values():
    value = {1: np.array([1.0, NAN]), "t": torch.tensor([[NAN, 2.0]]), "s": {3, 1}, "b": np.bool_(True),
             "i": np.int64(5), "x": -float("inf")}
    out = to_jsonable(value)
    assert out == {"1": [1.0, None], "t": [[None, 2.0]], "s": [1, 3], "b": True, "i": 5, "x": None}
    assert type(out["i"]) is int and type(out["b"]) is bool
    json.dumps(out, allow_nan=False)


# ------------------------------------------------------------------------------------------------ CSV


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


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda runs: setattr(runs[1], "label", "a"), "used twice"),
        (lambda runs: runs[0].curves.__setitem__("text", np.zeros(3)), "one length"),
        (lambda runs: runs[0].curves.pop("count"), "lack 'count'"),
    ],
)
def test_bad_runs_are_refused_before_writing(tmp_path, mutate, message):
    runs = [make_run("a", 5), make_run("b", 5)]
    mutate(runs)
    with pytest.raises(ValueError, match=message):
        write(tmp_path, runs)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ plot


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


# ------------------------------------------------------------------------------------------------ atomic writes


def test_failed_plot_leaves_previous_files_intact(tmp_path, monkeypatch):
    paths = write(tmp_path, [make_run("old", 5)])
    before = {p.name: p.read_bytes() for p in paths["json"].parent.iterdir()}

    def boom(runs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_loss_curves", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write(tmp_path, [make_run("new", 7)])
    assert {p.name: p.read_bytes() for p in paths["json"].parent.iterdir()} == before


def test_failure_mid_write_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    paths = write(tmp_path, [make_run("old", 5)])
    before = {p.name: p.read_bytes() for p in paths["json"].parent.iterdir()}
    calls = []

    def fsync_fails_on_json(fd):  # the bytes are in the temporary file, it is not yet renamed
        calls.append(fd)
        if len(calls) == 3:  # csv, png, then json
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_fails_on_json)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, [make_run("new", 7)])
    after = {p.name: p.read_bytes() for p in paths["json"].parent.iterdir()}
    assert set(after) == {"results.json", "per_position.csv", "loss_curve.png"}  # no temporary file left
    assert after["results.json"] == before["results.json"]  # the old record, whole
    assert len(read_csv(paths["csv"])) == 1 + 7  # the files before json were replaced whole


def test_failure_on_first_write_leaves_empty_dir(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write(tmp_path, [make_run("m", 5)])
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------------------------------ table


def test_summary_table():
    small = make_run("baseline", 6)
    big = make_run("ttt", 6, text=False, seed=1)
    big.metrics["flat"]["librilight_loss_24k"] = 1.5
    big.driver_report["memory"] = {"peak_bytes": 512 * 2**20, "constant_memory": None}
    del big.driver_report["frames_per_second"]
    lines = summary_table([small, big]).splitlines()
    assert lines[0].split() == ["baseline", "ttt"]
    assert set(lines[1]) == {"-", " "}
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    width = len(lines[0])
    assert all(len(line) == width for line in lines)  # fixed width
    assert rows["frames"] == ["12", "12"] and rows["sequences"] == ["2", "2"]
    assert rows["loss combined"] == ["3.1416", "3.1416"]
    assert rows["loss text"] == ["1.2500", "—"]
    assert rows["librilight_loss_8k"] == ["2.3457", "2.3457"]
    assert rows["librilight_loss_16k"] == ["—", "—"]  # NaN
    assert rows["librilight_loss_24k"] == ["—", "1.5000"]  # absent / present
    assert rows["librilight_slope"] == ["-0.01235", "-0.01235"]
    assert rows["frames/s"] == ["1,234.6", "—"]
    assert rows["peak memory"] == ["1.50", "GiB", "512.0", "MiB"]
    assert rows["constant memory"] == ["yes", "unknown"]


def test_summary_table_without_text_has_no_text_row():
    assert "loss text" not in summary_table([make_run("m", 4, text=False)])


# ------------------------------------------------------------------------------------------------ environment


def _head_from_git_files(repo: Path) -> str:
    """HEAD resolved by reading .git directly: an independent check of `git rev-parse HEAD`."""
    head = (repo / ".git" / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head
    ref = head[5:]
    loose = repo / ".git" / ref
    if loose.is_file():
        return loose.read_text().strip()
    for line in (repo / ".git" / "packed-refs").read_text().splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    raise AssertionError(f"{ref} not found")


def test_environment_info_cpu(monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    env = environment_info("cpu")
    for key in ("fused_stream", "moshi", "torch", "triton", "numpy", "python", "platform", "device_name"):
        assert key in env
    assert env["torch"] == str(torch.__version__) and env["numpy"] == np.__version__
    assert env["device"] == "cpu" and f"({os.cpu_count()} cores)" in env["device_name"]
    if (repo / ".git").is_dir():
        assert env["git_commit"] == _head_from_git_files(repo)
    json.dumps(to_jsonable(env), allow_nan=False)


def test_git_commit_none_outside_a_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert git_commit() is None
    assert environment_info(torch.device("cpu"))["git_commit"] is None


def test_git_commit_none_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert git_commit() is None
