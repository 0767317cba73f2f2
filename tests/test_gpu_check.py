"""`python -m fused_stream.gpu_check --dry-run`: the GPU checks' sequence on the CPU, tiny sizes, one line per check."""

from __future__ import annotations

import json
import subprocess
import sys

from fused_stream.gpu_check.checks import CHECKS
from fused_stream.gpu_check.run import result_stem, slug


def test_dry_run_prints_one_line_per_check_and_writes_the_files(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fused_stream.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("versions: torch ") and "moshi" in lines[0] and "driver" in lines[0]
    checks = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert list(checks) == [name for name, _, _ in CHECKS]
    for name in ("a_capture_short_batch", "c_graph_vs_eager_bits"):  # CUDA only
        assert checks[name] == "SKIP" and "skipped: no CUDA" in next(line for line in lines if name in line)
    for name in ("b_pytest_gpu", "d_memory_flat_nvml", "e_moshi7b_cli_verify", "f_loss_kernel_bandwidth",
                 "g_throughput"):
        assert checks[name] == "PASS", proc.stdout
    assert lines[-1].startswith("OK: no check failed")
    [json_file] = tmp_path.glob("cpu-*.json")
    [md_file] = tmp_path.glob("cpu-*.md")
    record = json.loads(json_file.read_text())
    assert record["dry_run"] and [c["name"] for c in record["checks"]] == list(checks)
    assert {c["status"] for c in record["checks"]} == {"pass", "skipped"}
    assert "| g_throughput | pass |" in md_file.read_text()


def test_names(tmp_path):
    assert slug("NVIDIA H200") == "nvidia-h200" and slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert result_stem(tmp_path, "NVIDIA H200", "2026-11-30").name == "nvidia-h200-2026-11-30"
    (tmp_path / "nvidia-h200-2026-11-30.json").write_text("{}")
    assert result_stem(tmp_path, "NVIDIA H200", "2026-11-30").name == "nvidia-h200-2026-11-30-b"
