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


def test_atomic_write_gives_the_usual_mode_and_keeps_an_existing_files(tmp_path):
    import stat

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.json", b"{}")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644  # not mkstemp's 0600
        os.umask(0o027)
        atomic_write(tmp_path / "other.json", b"{}")
        assert stat.S_IMODE((tmp_path / "other.json").stat().st_mode) == 0o640
        (tmp_path / "new.json").chmod(0o600)  # the user's choice survives a rewrite
        atomic_write(tmp_path / "new.json", b"[]")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o600
    finally:
        os.umask(mask)


def test_the_default_output_folder_is_git_ignored():
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", "fused_stream_out/results.json"], cwd=repo,
                          check=False)
    assert done.returncode == 0
