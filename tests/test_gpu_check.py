"""`python -m fused_stream.gpu_check --dry-run`: the GPU checks' sequence on the CPU, tiny sizes, rehearsed graphs,
one line per check; the bootstrap that installs moshi from wheels on a machine without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fused_stream.gpu_check.checks import CHECKS, bucket_calls, wrap_frames
from fused_stream.gpu_check.run import DEFAULT_BUDGET_S, result_stem, slug

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_prints_one_line_per_check_and_writes_the_files(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fused_stream.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("versions: torch ") and "moshi" in lines[0] and "driver" in lines[0]
    checks = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert list(checks) == [name for name, _, _ in CHECKS]
    assert set(checks.values()) == {"PASS"}, proc.stdout  # every check's control flow runs on the CPU
    assert lines[-1].startswith("OK: no check failed")
    [json_file] = tmp_path.glob("cpu-*.json")
    [md_file] = tmp_path.glob("cpu-*.md")
    record = json.loads(json_file.read_text())
    assert record["dry_run"] and record["complete"] and [c["name"] for c in record["checks"]] == list(checks)
    assert {c["status"] for c in record["checks"]} == {"pass"}
    assert "| f_throughput | pass |" in md_file.read_text()
    # b streamed past the ring's wrap at C = 1 and C > 1, every fill bucket's step replayed and compared
    rows = next(c for c in record["checks"] if c["name"] == "b_graph_vs_eager_bits")["data"]["rows"]
    assert [r["chunk"] for r in rows] == [1, 8]
    for row in rows:
        assert row["frames"] > row["ring"] and min(row["bucket_calls"]) > 0
        assert row["verified_calls"] == row["frames"] // row["chunk"]


def test_the_budgets_fit_eight_minutes():
    assert sum(budget for _, _, budget in CHECKS) <= DEFAULT_BUDGET_S <= 8 * 60 - 30  # 30 s left to start up


def test_the_wrap_check_reaches_every_bucket():
    """`small` (ring 3000 at C = 1, 3007 at C = 8): the batch reaches every fill bucket, the full ring included."""
    for chunk in (1, 8):
        ring = 3000 + chunk - 1
        calls = bucket_calls(ring, wrap_frames(ring, chunk), chunk)
        assert len(calls) == 16 and min(calls) > 0


def test_results_written_after_each_check_survive_a_later_crash(tmp_path):
    """A check that kills the process (here: os._exit in the second) leaves the first one's result on disk."""
    script = (f"import sys; sys.argv = ['x']; from fused_stream.gpu_check import run\n"
              f"def fine(ctx, budget): return 'fine', {{}}\n"
              f"def dies(ctx, budget):\n    import os; os._exit(3)\n"
              f"run.CHECKS[:] = [('a_fine', fine, 10.0), ('b_dies', dies, 10.0)]\n"
              f"sys.exit(run.main(['--dry-run', '--out', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    [json_file] = tmp_path.glob("cpu-*.json")
    record = json.loads(json_file.read_text())
    assert not record["complete"] and [c["name"] for c in record["checks"]] == ["a_fine"]


def test_names(tmp_path):
    assert slug("NVIDIA H200") == "nvidia-h200" and slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert result_stem(tmp_path, "NVIDIA H200", "2026-11-30").name == "nvidia-h200-2026-11-30"
    (tmp_path / "nvidia-h200-2026-11-30.json").write_text("{}")
    assert result_stem(tmp_path, "NVIDIA H200", "2026-11-30").name == "nvidia-h200-2026-11-30-b"


# --- the bootstrap: a machine whose Python has torch but not moshi ---------------------------------------------------

# Hides the moshi installed in site-packages (as on the GPU image); one installed anywhere else, such as the
# bootstrap's `.whl/.site`, is found as usual.
_HIDE_MOSHI = '''
import importlib.abc, importlib.machinery, os, site, sys
_HIDDEN = {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
class _HideMoshi(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "moshi":
            return None
        paths = [p for p in sys.path if os.path.realpath(p or ".") not in _HIDDEN]
        spec = importlib.machinery.PathFinder.find_spec(name, paths)
        if spec is None:
            raise ModuleNotFoundError("No module named 'moshi'", name="moshi")
        return spec
sys.meta_path.insert(0, _HideMoshi())
'''


def _without_moshi(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_HIDE_MOSHI)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fused_stream.gpu_check", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


def test_without_moshi_and_without_wheels_one_line_says_what_to_do(tmp_path):
    proc = _without_moshi(tmp_path, "--dry-run", "--wheels", str(tmp_path / "no-wheels"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: moshi is not importable") and "pip download --no-deps -d" in line
    assert proc.stdout == ""


@pytest.fixture(scope="session")
def moshi_wheel() -> Path:
    """moshi's wheel, downloaded once into a temporary cache (skip when there is no network)."""
    cache = Path(tempfile.gettempdir()) / "fused_stream_test_wheels"
    found = sorted(cache.glob("moshi-0.2.13-*.whl"))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache),
                               "moshi==0.2.13"], capture_output=True, text=True, timeout=180)
        found = sorted(cache.glob("moshi-0.2.13-*.whl"))
        if proc.returncode != 0 or not found:
            pytest.skip(f"cannot download moshi's wheel: {proc.stderr.strip()[-200:]}")
    return found[0]


def test_without_moshi_the_wheels_are_installed_and_the_checks_run(tmp_path, moshi_wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(moshi_wheel, wheels)
    proc = _without_moshi(tmp_path, "--dry-run", "--wheels", str(wheels), "--only", "d", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"gpu_check: installed {moshi_wheel.name} into {wheels / '.site'}"
    assert "moshi 0.2.13" in lines[1] and lines[2].startswith("PASS  d_loss_kernel_bandwidth")
    [json_file] = tmp_path.glob("cpu-*.json")
    assert json.loads(json_file.read_text())["versions"]["moshi_path"] == str(wheels / ".site" / "moshi")
