"""jsonio.py: strict-JSON copies of evaluation data, and atomic file replacement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from report_fixtures import NAN

from fused_stream.jsonio import atomic_write, to_jsonable


def test_to_jsonable_converts_nested_values():
    value = {1: np.array([1.0, NAN]), "t": torch.tensor([[NAN, 2.0]]), "s": {3, 1}, "b": np.bool_(True),
             "i": np.int64(5), "x": -float("inf")}
    out = to_jsonable(value)
    assert out == {"1": [1.0, None], "t": [[None, 2.0]], "s": [1, 3], "b": True, "i": 5, "x": None}
    assert type(out["i"]) is int and type(out["b"]) is bool
    json.dumps(out, allow_nan=False)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"newer")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left
