"""Provenance for results.json: package versions, platform, device name and git commit of the run.

A number in a results file is only comparable with another when one knows what produced both. Every probe here
may fail (no git, an odd platform, a device that will not say its name); a failed probe gives None, never an
exception, because it runs after the evaluation and must not cost its results.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..version import __version__

log = logging.getLogger(__name__)


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Versions, platform, device name and git commit, for results.json. A failed probe gives None, never a crash."""
    device = torch.device(device)
    return {
        "fused_stream": _dist_version("fused_stream") or __version__,
        "moshi": _dist_version("moshi"),
        "torch": str(torch.__version__),
        "triton": _dist_version("triton"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),  # what this process may use: affinity and cgroup quota
        "threads": torch.get_num_threads(),  # torch's intra-op threads during the run
        "git_commit": git_commit(),
    }


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return f"{_cpu_model()} ({os.cpu_count()} cores)"
    except Exception as exc:  # a provenance probe must not kill a finished run
        log.warning("could not read the name of device %s: %s: %s", device, type(exc).__name__, exc)
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform.processor() is the best there is
    return platform.processor() or platform.machine() or "CPU"


def git_commit(cwd: str | Path | None = None, timeout: float = 5.0) -> str | None:
    """HEAD of the git repository holding `cwd` (default: the working directory), or None if there is none."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):  # git missing, or hung (network file system)
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """The CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota (v2 `cpu.max` of
    its cgroup and every ancestor, or v1 `cpu.cfs_quota_us`), rounded up; at least 1.

    `os.cpu_count()` counts the machine's CPUs; a container or `taskset` may grant far fewer, and a thread pool
    sized to the machine then fights itself for the few it has.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs' worth of quota of this process's cgroup (the tightest along its path); None if unlimited or unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: "0::/path"
            folder = root / rel.lstrip("/")
            while True:
                quotas.append(_v2_quota(folder / "cpu.max"))
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):  # cgroup v1: "N:cpu,cpuacct:/path"
            for base in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if base.is_dir():
                    folder = base / rel.lstrip("/")
                    quotas.append(_v1_quota(folder if folder.is_dir() else base))
                    break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def idle_cpus(interval: float = 0.15, stat: str | Path = "/proc/stat") -> float | None:
    """How many of this process's CPUs (its affinity mask) sat idle over the next `interval` seconds, from the
    kernel's per-CPU counters; None where they cannot be read (not Linux).

    A CPU another process keeps busy is allowed but not available: a thread pool that counts it gets only a slice
    of it, and every parallel region then waits for that thread (on a 2-CPU machine with one CPU busy, 2 threads
    ran the demo 250x slower than 1).
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    first = _cpu_times(Path(stat))
    if not first:
        return None
    time.sleep(interval)
    second = _cpu_times(Path(stat))
    idle = 0.0
    for cpu in allowed:
        if cpu not in first or cpu not in second:
            continue
        (idle0, total0), (idle1, total1) = first[cpu], second[cpu]
        if total1 > total0:
            idle += (idle1 - idle0) / (total1 - total0)
    return idle


@dataclass(frozen=True)
class CpuSample:
    """A point in time for `others_cpu`: the machine's busy CPU time on this process's CPUs and this process's own.

    Why both: the kernel counts every process's busy time per CPU (/proc/stat); this process knows its own
    (`time.process_time()`, plus its children that have been waited for). What is left between two samples is what
    other processes (and the hypervisor's steal time) took from the CPUs this process may run on.
    """

    wall: float  # time.perf_counter()
    busy: float | None  # busy CPU-seconds since boot on the CPUs of `cpus` (all but idle and iowait); None: unknown
    own: float  # CPU-seconds of this process and its waited-for children
    cpus: int  # CPUs summed in `busy`

    @classmethod
    def take(cls, stat: str | Path = "/proc/stat") -> CpuSample:
        try:
            allowed: set[int] | None = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux: count every CPU the file lists
            allowed = None
        times = _cpu_times(Path(stat))
        mine = [total - idle for cpu, (idle, total) in times.items() if allowed is None or cpu in allowed]
        t = os.times()
        return cls(wall=time.perf_counter(), busy=sum(mine) / _ticks_per_second() if mine else None,
                   own=time.process_time() + t.children_user + t.children_system, cpus=len(mine))


def others_cpu(before: CpuSample, after: CpuSample) -> dict[str, float] | None:
    """What other processes used of this process's CPUs between two samples, or None where /proc/stat is unreadable:

    - `others_cpu_seconds`: busy CPU-seconds of the machine minus this process's own (never below 0);
    - `others_cpu_share`: those seconds per wall second, i.e. how many of these CPUs others kept busy on average;
    - `resolution_seconds`: how far off `others_cpu_seconds` may be: /proc/stat counts whole ticks (1/100 s), so
      each CPU's difference of two readings is off by up to one tick. A window much shorter than a tick per CPU
      cannot tell contention from rounding.
    """
    if before.busy is None or after.busy is None:
        return None
    wall = max(after.wall - before.wall, 1e-9)
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own))
    return {"others_cpu_seconds": others, "others_cpu_share": others / wall, "wall_seconds": wall,
            "resolution_seconds": max(before.cpus, after.cpus) / _ticks_per_second()}


def contended(usage: dict[str, float] | None, limit_cpus: float) -> bool | None:
    """Whether others used more than `limit_cpus` CPUs on average over the window `usage` (from `others_cpu`); None
    when unknown: no /proc/stat, or a window so short that tick rounding could move the share by more than half the
    limit (on 2 CPUs and a limit of 0.2: windows under 0.2 s)."""
    if usage is None:
        return None
    wall = usage["wall_seconds"]
    if usage["resolution_seconds"] > 0.5 * limit_cpus * wall:
        return None
    return usage["others_cpu_seconds"] > limit_cpus * wall


def _ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100  # USER_HZ on every Linux build


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """{cpu: (idle + iowait ticks, all ticks)} from /proc/stat; {} if unreadable."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and len(fields) >= 5 and all(v.isdigit() for v in fields[:8]):
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (sum(values[3:5]), sum(values))
    return times
