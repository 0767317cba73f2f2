"""report/environment.py: versions, device name and the git commit, None wherever a probe fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_stream.jsonio import to_jsonable
from fused_stream.report.environment import (
    CpuSample,
    available_cpus,
    contended,
    environment_info,
    git_commit,
    idle_cpus,
    others_cpu,
)


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


def _stat(path: Path, busy: dict[int, int], idle: int = 1000) -> None:
    """A /proc/stat with the given busy ticks (user, system, irq, steal) per CPU, plus an aggregate line and a CPU
    this process may not use (it must not count)."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for cpu, ticks in busy.items():
        user, system, irq, steal = ticks // 2, ticks // 4, ticks // 8, ticks - ticks // 2 - ticks // 4 - ticks // 8
        lines.append(f"cpu{cpu} {user} 0 {system} {idle} 7 {irq} 0 {steal} 0 0")
    path.write_text("\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n")


def test_others_cpu_is_machine_busy_time_minus_our_own(tmp_path, monkeypatch):
    import fused_stream.report.environment as environment

    cpus = sorted(os.sched_getaffinity(0))
    outside = max(cpus) + 1  # a CPU outside the affinity mask: others busy there do not slow us
    stat, hz = tmp_path / "stat", os.sysconf("SC_CLK_TCK")
    clock = {"wall": 100.0, "own": 5.0, "children": 1.0}
    monkeypatch.setattr(environment.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(environment.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(environment.os, "times",
                        lambda: os.times_result((0.0, 0.0, clock["children"], 0.0, 0.0)))

    _stat(stat, {c: 0 for c in cpus} | {outside: 0})
    before = CpuSample.take(stat)
    assert before.busy == 0.0 and before.cpus == len(cpus) and before.own == 6.0
    # 2 s later: we used 1.5 CPU-seconds (1.0 in this process, 0.5 in a waited-for child); the CPUs we may use were
    # busy for 3 s in all (idle/iowait ticks do not count), and CPU `outside` for 2 s (it does not count).
    clock.update(wall=102.0, own=6.0, children=1.5)
    busy = {c: 0 for c in cpus}
    busy[cpus[0]] = int(1.5 * hz)
    busy[cpus[-1]] += int(1.5 * hz)
    _stat(stat, busy | {outside: 2 * hz}, idle=5000)
    after = CpuSample.take(stat)
    assert after.busy == pytest.approx(3.0) and after.own == pytest.approx(7.5)
    usage = others_cpu(before, after)
    assert usage == pytest.approx({"others_cpu_seconds": 1.5, "others_cpu_share": 0.75, "wall_seconds": 2.0,
                                   "resolution_seconds": len(cpus) / hz})
    # Our own time counted more precisely than the kernel's ticks: never a negative share.
    clock.update(own=9.0)
    assert others_cpu(before, CpuSample.take(stat))["others_cpu_seconds"] == 0.0
    # No /proc/stat (not Linux): unknown, not zero.
    missing = CpuSample.take(tmp_path / "missing")
    assert missing.busy is None and others_cpu(before, missing) is None


def test_contended_needs_a_window_long_enough_to_tell():
    def usage(others: float, wall: float, resolution: float = 0.02) -> dict[str, float]:
        return {"others_cpu_seconds": others, "others_cpu_share": others / wall, "wall_seconds": wall,
                "resolution_seconds": resolution}

    assert contended(usage(0.5, 2.0), 0.2) is True  # others kept a quarter of a CPU busy: over 0.2
    assert contended(usage(0.3, 2.0), 0.2) is False
    assert contended(usage(0.5, 2.0), 1.2) is False  # one CPU torch leaves free raises the limit
    # A 50 ms round: one tick of rounding per CPU is 0.4 CPUs' worth: cannot tell, whatever it read.
    assert contended(usage(0.05, 0.05), 0.2) is None and contended(usage(0.0, 0.05), 0.2) is None
    assert contended(usage(0.05, 0.2), 0.2) is True  # 0.2 s: rounding moves the share by at most 0.1
    assert contended(None, 0.2) is None
