"""bench/conftest.py: Ctrl-C in the middle of `pytest bench --benchmark-only --benchmark-json=F` writes what
finished to F, without pytest-benchmark's `min() arg is an empty sequence` traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

BENCHMARKS = '''
import os, signal

def test_finished(benchmark):
    benchmark.pedantic(lambda: sum(range(1000)), rounds=2, iterations=1)

def test_interrupted(benchmark):  # Ctrl-C in its first round: no round timed
    benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=2, iterations=1)

def test_never_reached(benchmark):
    benchmark.pedantic(lambda: 1, rounds=2, iterations=1)
'''


def test_ctrl_c_during_a_benchmark_writes_what_finished(tmp_path):
    shutil.copy(Path(__file__).parents[1] / "bench" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_benchmarks.py").write_text(BENCHMARKS)
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_benchmarks.py",
                          "--benchmark-only", f"--benchmark-json={out}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 2, log  # pytest's "interrupted"
    assert "empty sequence" not in log and "Traceback" not in log, log
    assert "interrupted before any round of: test_interrupted" in log
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_finished"]
