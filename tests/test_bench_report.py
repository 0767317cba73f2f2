"""bench_report on hand-built pytest-benchmark JSON: rows, hand-computed ratios, '—' for absent values, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fused_stream.bench_report import load_results, main, markdown, rows

CPU = "cpu (x86_64, 2 cores, 2 threads)"
MIB = 2**20


def bench(name: str, median: float, **extra) -> dict:
    return {"name": name, "fullname": f"bench/test_x.py::{name}", "stats": {"median": median, "mean": median},
            "extra_info": extra}


def results(benchmarks: list[dict], brand: str = "AMD EPYC 7B13") -> dict:
    return {"machine_info": {"node": "vm", "cpu": {"brand_raw": brand, "count": 2}},
            "commit_info": {"id": "0123456789abcdef", "dirty": True}, "datetime": "2026-11-25T10:00:00",
            "benchmarks": benchmarks}


def cpu_run() -> dict:
    common = {"preset": "small", "device": CPU, "dtype": "torch.float32", "T": 600}
    return results([
        bench("test_naive_streaming", 10.0, path="naive_streaming", B=1, frames=600, frames_per_second=60.0,
              **common),
        # No frames_per_second: frames / median = 8 * 600 / 20 = 240 frames/s.
        bench("test_chunk_mode_c64_b8", 20.0, path="chunk_mode_C64_B8", B=8, frames=4800,
              peak_memory_bytes=800 * MIB, constant_memory=True, **common),
        bench("test_batch_losses", 0.5, path="batch_losses", B=1, frames=600, frames_per_second=1200.0,
              peak_memory_bytes=2000 * MIB, **common),
        bench("test_step_loss[plain_torch-8-1]", 0.001),  # a kernel case: no extra_info keys at all
    ])


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_rows_ratios_are_hand_computed(tmp_path):
    table = rows(load_results(write(tmp_path, "cpu.json", cpu_run())))
    assert [r["path"] for r in table] == ["naive_streaming", "chunk_mode_C64_B8", "batch_losses",
                                          "test_step_loss[plain_torch-8-1]"]
    naive, chunk, batch, kernel = table
    assert naive["vs_naive"] == pytest.approx(1.0)
    assert chunk["frames_per_second"] == pytest.approx(240.0)
    assert chunk["vs_naive"] == pytest.approx(4.0)
    assert batch["vs_naive"] == pytest.approx(20.0)
    assert chunk["C"] == 64 and naive["C"] is None  # C from the name convention only where the name says it
    assert chunk["memory_vs_batch"] == pytest.approx(0.4)
    assert chunk["constant_memory"] is True and batch["constant_memory"] is None
    assert naive["vs_lmgen"] is None  # no lmgen* path in this run
    assert all(kernel[k] is None for k in ("device", "B", "T", "frames_per_second", "vs_naive", "peak_memory_bytes"))


def test_lmgen_ratio_and_gpu_fields():
    gpu = "NVIDIA H100 80GB HBM3"
    data = results([
        bench("test_lmgen", 1.0, path="lmgen_graphed", device=gpu, frames_per_second=100.0),
        bench("test_graphs[C1-B1-graphed]", 1.0, path="graphed_frame_B1", device=gpu, frames_per_second=250.0,
              roofline_ratio=0.625, mfu=None, torch_max_allocated_bytes=3 * 2**30, constant_memory=False),
    ])
    lmgen, graphed = rows(data)
    assert graphed["vs_lmgen"] == pytest.approx(2.5) and lmgen["vs_lmgen"] == pytest.approx(1.0)
    assert graphed["vs_naive"] is None
    assert graphed["peak_memory_bytes"] == 3 * 2**30  # falls back to torch_max_allocated_bytes
    text = markdown([data])
    assert "GPU: NVIDIA H100 80GB HBM3" in text
    line = next(ln for ln in text.splitlines() if "`graphed_frame_B1`" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7:] == ["250.0", "—", "2.50×", "3.00 GiB", "—", "62.5 %", "—", "grows"]


def test_memory_ratio_uses_batch_row_of_same_length():
    data = results([
        bench(f"test_peak_memory_vs_length[{path}-{T}]", 1.0, path=f"memory_{path}", T=T, B=1, device="cpu",
              peak_memory_bytes=peak * MIB)
        for path, T, peak in [("chunk_C64", 1000, 100), ("chunk_C64", 8000, 104), ("batch_losses", 1000, 200),
                              ("batch_losses", 8000, 1600), ("frame_B1", 2000, 90)]
    ])
    chunk_1k, chunk_8k, batch_1k, batch_8k, frame_2k = rows(data)
    assert chunk_1k["memory_vs_batch"] == pytest.approx(0.5)
    assert chunk_8k["memory_vs_batch"] == pytest.approx(0.065)
    assert batch_8k["memory_vs_batch"] == pytest.approx(1.0) and chunk_8k["C"] == 64
    assert frame_2k["memory_vs_batch"] is None  # no batch_losses row at T=2000
    assert chunk_1k["frames_per_second"] is None  # the memory suite records no frames


def test_markdown_cells_and_dashes(tmp_path):
    text = markdown([load_results(write(tmp_path, "cpu.json", cpu_run()))])
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| path"))
    assert "frames/s" in header and "vs per-frame loop" in header and "vs LMGen" in header
    chunk = next(ln for ln in lines if "`chunk_mode_C64_B8`" in ln)
    cells = [c.strip() for c in chunk.strip("|").split("|")]
    assert cells == ["`chunk_mode_C64_B8`", CPU, "small", "torch.float32", "8", "64", "600", "240.0", "4.00×", "—",
                     "800 MiB", "0.40×", "—", "—", "flat"]
    kernel = next(ln for ln in lines if "test_step_loss" in ln)
    assert [c.strip() for c in kernel.strip("|").split("|")][1:] == ["—"] * 14
    assert "same run on the same machine" in text
    assert "AMD EPYC 7B13 (2 cores)" in text and "commit 0123456789ab (dirty)" in text


def test_two_files_two_tables(tmp_path, capsys):
    first = write(tmp_path, "a.json", cpu_run())
    other = results([bench("test_naive_streaming", 5.0, path="naive_streaming", frames_per_second=30.0)],
                    brand="Intel Xeon")
    second = write(tmp_path, "b.json", other)
    assert main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert out.count("| path |") == 2 and out.count("same run on the same machine") == 2
    assert out.index("a.json") < out.index("AMD EPYC") < out.index("b.json") < out.index("Intel Xeon")


def test_out_file(tmp_path):
    out = tmp_path / "table.md"
    assert main([str(write(tmp_path, "cpu.json", cpu_run())), "--out", str(out)]) == 0
    assert "`naive_streaming`" in out.read_text()


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"machine_info": {}}), json.dumps([1, 2])])
def test_bad_file_exits_2(tmp_path, capsys, content):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_report: error:") and "bad.json" in err and "\n" not in err


def test_help_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "fused_stream.bench_report", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--out" in proc.stdout


def contended_run() -> dict:
    """A run on a busy machine: the naive loop and one chunk row were slowed by other processes."""
    common = {"preset": "small", "device": CPU, "dtype": "torch.float32", "T": 600, "B": 1, "frames": 600}
    return results([
        bench("test_naive_streaming", 10.0, path="naive_streaming", frames_per_second=60.0, contended=True,
              others_cpu_share=0.95, **common),
        bench("test_naive_streaming_again", 5.0, path="naive_streaming_quiet", frames_per_second=120.0,
              contended=False, others_cpu_share=0.01, **common),
        bench("test_chunk_mode_c64", 1.0, path="chunk_mode_C64", frames_per_second=600.0, contended=True,
              others_cpu_share=1.2, **common),
        bench("test_frame_mode_b8", 2.0, path="frame_mode_B8", frames_per_second=300.0, contended=False, **common),
        # The memory suite times nothing shown: contended or not, its peak is its own and the row stays.
        bench("test_peak_memory_vs_length[batch_losses-600]", 1.0, path="memory_batch_losses", T=600,
              peak_memory_bytes=600 * MIB, contended=True, others_cpu_share=0.5),
    ])


def test_contended_rows_are_left_out_and_never_a_reference():
    data = contended_run()
    table = {r["path"]: r for r in rows(data)}
    assert table["chunk_mode_C64"]["contended"] and not table["frame_mode_B8"]["contended"]
    # The contended naive loop is no reference; the first clean naive_streaming* row is.
    assert table["frame_mode_B8"]["vs_naive"] == pytest.approx(2.5)
    assert table["memory_batch_losses"]["memory_vs_batch"] == pytest.approx(1.0)
    text = markdown([data])
    body = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert [ln.split("|")[1].strip() for ln in body] == ["`naive_streaming_quiet`", "`frame_mode_B8`",
                                                         "`memory_batch_losses`"]
    note = next(ln for ln in text.splitlines() if ln.startswith("Left out:"))
    assert "`naive_streaming` (others used 0.95 CPUs)" in note and "`chunk_mode_C64` (others used 1.20 CPUs)" in note
    assert "memory_batch_losses" not in note


def test_include_contended_marks_them(tmp_path, capsys):
    path = write(tmp_path, "busy.json", contended_run())
    assert main([str(path), "--include-contended"]) == 0
    out = capsys.readouterr().out
    chunk = next(ln for ln in out.splitlines() if "`chunk_mode_C64`" in ln)
    cells = [c.strip() for c in chunk.strip("|").split("|")]
    assert cells[0] == "`chunk_mode_C64` (contended)" and cells[7] == "600.0" and cells[8] == "5.00×"
    assert "Marked (contended):" in out and "| `memory_batch_losses` |" in out
    assert main([str(write(tmp_path, "quiet.json", cpu_run()))]) == 0
    quiet = capsys.readouterr().out  # a clean run says nothing about contention
    assert "(contended)" not in quiet and "Left out" not in quiet and "Marked" not in quiet


def test_verification_share_is_shown_against_its_goal_not_asserted():
    """bench/test_verify_bench.py records the verification's share of the run and the 5 % goal; the report lists each
    against the goal (met / missed), and a benchmark without a goal (the smoke size) is not listed."""
    verify = {"device": CPU, "B": 2, "T": 1000, "frames": 2000}
    text = markdown([results([
        bench("test_verification_fraction_of_run[chunk_C64]", 2.0, path="verify_chunk_C64", C=64,
              fraction_of_run=0.0321, goal_fraction=0.05, **verify),
        bench("test_verification_fraction_of_run[frame]", 9.0, path="verify_frame", C=1, fraction_of_run=0.0576,
              goal_fraction=0.05, contended=True, **verify),
        bench("test_verification_fraction_of_run[smoke]", 0.1, path="verify_smoke", fraction_of_run=0.2),
    ])])
    assert "- `verify_chunk_C64`: 3.21 % of the run (goal < 5 %: met)" in text
    assert "- `verify_frame`: 5.76 % of the run (goal < 5 %: missed) (contended: other processes took CPU)" in text
    assert "verify_smoke`: " not in text
    assert "Share of the run" not in markdown([cpu_run()])
