"""report/environment.py: versions, device name and the git commit, None wherever a probe fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_stream.jsonio import to_jsonable
from fused_stream.report.environment import available_cpus, environment_info, git_commit, idle_cpus


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


def test_environment_records_threads_and_usable_cpus():
    env = environment_info("cpu")
    assert env["threads"] == torch.get_num_threads() and env["cpus_available"] == available_cpus()


def _cgroup(tmp_path, proc_line, files):
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    (tmp_path / "cgroup").write_text(proc_line + "\n")
    return available_cpus(tmp_path / "fs", tmp_path / "cgroup")


def test_available_cpus_respects_affinity_and_cgroup_quotas(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "none", tmp_path / "none") == affinity
    # cgroup v2: 1.5 CPUs of quota on the process's own cgroup -> 2 threads; "max" is no limit
    assert _cgroup(tmp_path / "a", "0::/job", {"job/cpu.max": "150000 100000"}) == min(affinity, 2)
    assert _cgroup(tmp_path / "b", "0::/job", {"job/cpu.max": "max 100000"}) == affinity
    # a tighter quota on a parent cgroup applies too; a fraction of a CPU still gets one thread
    assert _cgroup(tmp_path / "c", "0::/a/b", {"a/b/cpu.max": "max 100000", "a/cpu.max": "50000 100000"}) == 1
    # cgroup v1
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    assert _cgroup(tmp_path / "d", "3:cpu,cpuacct:/", v1) == 1


def test_idle_cpus_counts_what_other_processes_leave(tmp_path):
    stat = tmp_path / "stat"
    cpus = sorted(os.sched_getaffinity(0))
    stat.write_text("".join(f"cpu{c} 0 0 0 0 0 0 0 0\n" for c in cpus))
    calls = []

    def sleep(_seconds):  # between the two samples: CPU 0 fully busy, every other CPU idle
        calls.append(1)
        stat.write_text("".join(f"cpu{c} {100 if c == cpus[0] else 0} 0 0 {0 if c == cpus[0] else 100} 0 0 0 0\n"
                                for c in cpus))

    import fused_stream.report.environment as environment

    original = environment.time.sleep
    environment.time.sleep = sleep
    try:
        assert idle_cpus(stat=stat) == pytest.approx(len(cpus) - 1) and calls == [1]
    finally:
        environment.time.sleep = original
    assert idle_cpus(stat=tmp_path / "missing") is None
