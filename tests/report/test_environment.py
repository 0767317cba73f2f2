"""report/environment.py: versions, device name and the git commit, None wherever a probe fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from fused_stream.jsonio import to_jsonable
from fused_stream.report.environment import environment_info, git_commit


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
    repo = Path(__file__).resolve().parents[2]
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
