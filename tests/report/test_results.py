"""report/results.py: the three files written all or none, results.json strict, bad runs refused, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from report_fixtures import make_run, read_csv, strict_load, write

from fused_stream.report.results import write_reports


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


# ------------------------------------------------------------------------------------------------ atomic writes


def test_failed_plot_leaves_previous_files_intact(tmp_path, monkeypatch):
    paths = write(tmp_path, [make_run("old", 5)])
    before = {p.name: p.read_bytes() for p in paths["json"].parent.iterdir()}

    def boom(runs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr("fused_stream.report.loss_plot.plot_loss_curves", boom)
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
