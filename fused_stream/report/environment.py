"""Provenance for results.json: package versions, platform, device name and git commit of the run.

A number in a results file is only comparable with another when one knows what produced both. Every probe here
may fail (no git, an odd platform, a device that will not say its name); a failed probe gives None, never an
exception, because it runs after the evaluation and must not cost its results.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
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
