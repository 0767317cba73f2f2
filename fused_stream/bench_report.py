"""Turn pytest-benchmark JSON files into markdown ratio tables.

    python -m fused_stream.bench_report RESULTS.json [MORE.json ...] [--out FILE.md]

Each file (one `pytest bench --benchmark-only --benchmark-json=FILE` run) becomes its own table: speed-ups and
memory ratios are only computed between rows of the same file, because timings from different runs or machines
are not comparable. A value the JSON does not record is shown as "—", never estimated.

A benchmark that other processes slowed down (`extra_info["contended"]`, set by bench/conftest.py when they took
more than a threshold of its CPUs even after repeats) is left out of the table and named below it, and is never
the reference of a ratio: on a shared 2-core machine such a row is 5-15x off. `--include-contended` keeps them in
the table, marked. A contended row none of whose cells depend on time (the memory suite's peaks) stays in.

Benchmarks that record a share of their run against a goal (`extra_info["fraction_of_run"]` and `"goal_fraction"`:
the verification's cost, bench/test_verify_bench.py) are listed under the table with the goal, met or missed: a
goal is reported, never asserted, so a noisy timing never fails a run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .errors import FusedStreamError

MISSING = "—"
NAIVE_PATH = "naive_streaming"  # the seed's per-frame loop (bench/test_driver_bench.py)
LMGEN_PREFIX = "lmgen"  # moshi's own LMGen loop, the anchor a Moshi user would pick today
BATCH_PATH = "batch_losses"  # the O(T^2)-memory batch path, the memory reference
TIMED = ("frames_per_second", "vs_naive", "vs_lmgen", "roofline_ratio", "mfu")  # cells a busy machine changes
COLUMNS = [
    ("path", "path"), ("device", "device"), ("preset", "preset"), ("dtype", "dtype"), ("B", "B"), ("C", "C"),
    ("T", "T"), ("frames/s", "frames_per_second"), ("vs per-frame loop", "vs_naive"), ("vs LMGen", "vs_lmgen"),
    ("peak memory", "peak_memory_bytes"), ("memory vs batch_losses", "memory_vs_batch"),
    ("roofline", "roofline_ratio"), ("MFU", "mfu"), ("constant memory", "constant_memory"),
]


class BenchReportError(FusedStreamError, ValueError):
    """A results file that is missing or not a pytest-benchmark JSON document."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate one pytest-benchmark JSON file; raises BenchReportError with a one-line reason."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchReportError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BenchReportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    # Validate the shape up front so a wrong file fails with a clear line instead of a KeyError deep inside.
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    for i, bench in enumerate(data["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("name"), str):
            raise BenchReportError(f"{path}: benchmark #{i} has no 'name'")
    data["report_source"] = str(path)
    return data


def _num(value: Any) -> float | None:
    # bool is an int subclass: a stray True must not become 1.0; NaN/inf are "not measured", not numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None and number == int(number) else None


def _chunk(info: dict[str, Any], path: str) -> int | None:
    """C from extra_info, else from the bench naming convention (`chunk_mode_C64`, `eager_chunk_C64_B1`)."""
    for key in ("C", "chunk", "chunk_size"):
        if _int(info.get(key)) is not None:
            return _int(info.get(key))
    match = re.search(r"(?:^|_)C(\d+)(?:_|$)", path)
    return int(match.group(1)) if match else None


def _frames_per_second(bench: dict[str, Any]) -> float | None:
    info = bench.get("extra_info") or {}
    fps = _num(info.get("frames_per_second"))
    if fps is not None:
        return fps
    # The conftest only sets frames_per_second when timing ran; fall back to frames / median when both exist.
    frames, median = _num(info.get("frames")), _num((bench.get("stats") or {}).get("median"))
    return frames / median if frames is not None and median else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per benchmark with the COLUMNS keys; None where the JSON lacks the value or a ratio's reference."""
    out: list[dict[str, Any]] = []
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        path = info.get("path") if isinstance(info.get("path"), str) else bench["name"]
        peak = _num(info.get("peak_memory_bytes"))
        if peak is None:
            peak = _num(info.get("torch_max_allocated_bytes"))
        constant = info.get("constant_memory")
        out.append({
            "path": path, "name": bench["name"],
            "device": info.get("device") if isinstance(info.get("device"), str) else None,
            "preset": info.get("preset") if isinstance(info.get("preset"), str) else None,
            "dtype": info.get("dtype") if isinstance(info.get("dtype"), str) else None,
            "B": _int(info.get("B")), "C": _chunk(info, path), "T": _int(info.get("T")),
            "frames_per_second": _frames_per_second(bench), "peak_memory_bytes": peak,
            "roofline_ratio": _num(info.get("roofline_ratio")), "mfu": _num(info.get("mfu")),
            "constant_memory": constant if isinstance(constant, bool) else None,
            "contended": info.get("contended") is True,
            "others_cpu_share": _num(info.get("others_cpu_share")),
        })
    clean = [r for r in out if not r["contended"]]  # a contended row is no reference: its speed is not its own

    def reference(match) -> dict[str, Any] | None:
        return next((r for r in clean if match(r["path"])), None)

    naive = reference(lambda p: p.startswith(NAIVE_PATH))
    lmgen = reference(lambda p: p.lower().startswith(LMGEN_PREFIX))
    for row in out:
        row["vs_naive"] = _ratio(row["frames_per_second"], naive and naive["frames_per_second"])
        row["vs_lmgen"] = _ratio(row["frames_per_second"], lmgen and lmgen["frames_per_second"])
        # Memory depends on the length: compare with a batch_losses row (`batch_losses`, `memory_batch_losses`)
        # of the same T only, so the memory-vs-length suite gives one ratio per T.
        # (a contended row's peak memory is still its own)
        batch = next((r for r in out if r["T"] == row["T"] and r["peak_memory_bytes"] is not None
                      and (r["path"] == BATCH_PATH or r["path"].endswith("_" + BATCH_PATH))), None)
        row["memory_vs_batch"] = _ratio(row["peak_memory_bytes"], batch and batch["peak_memory_bytes"])
    return out


def _bytes(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return MISSING
    if key == "path":
        return f"`{value}`"
    if key == "frames_per_second":
        return f"{value:.1f}"
    if key in ("vs_naive", "vs_lmgen", "memory_vs_batch"):
        return f"{value:.2f}×"
    if key == "peak_memory_bytes":
        return _bytes(value)
    if key in ("roofline_ratio", "mfu"):
        return f"{100 * value:.1f} %"
    if key == "constant_memory":
        return "flat" if value else "grows"
    return str(value).replace("|", "\\|")  # a '|' in a device name would split the markdown cell


def _machine(results: dict[str, Any], table: list[dict[str, Any]]) -> str:
    machine = results.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    parts = []
    brand = cpu.get("brand_raw") if isinstance(cpu, dict) else None
    if brand:
        count = cpu.get("count")
        parts.append(f"CPU: {brand}" + (f" ({count} cores)" if count else ""))
    gpus = sorted({r["device"] for r in table if r["device"] and not r["device"].lower().startswith("cpu")})
    if gpus:
        parts.append("GPU: " + ", ".join(gpus))
    if machine.get("node"):
        parts.append(f"host: {machine['node']}")
    commit = results.get("commit_info") or {}
    if commit.get("id"):
        parts.append(f"commit {str(commit['id'])[:12]}" + (" (dirty)" if commit.get("dirty") else ""))
    if results.get("datetime"):
        parts.append(str(results["datetime"]))
    return "; ".join(parts) if parts else "machine not recorded"


def _contention(row: dict[str, Any]) -> str:
    share = row["others_cpu_share"]
    return f"`{row['path']}`" + (f" (others used {share:.2f} CPUs)" if share is not None else "")


def markdown(results_list: list[dict[str, Any]], include_contended: bool = False) -> str:
    """One section per results file: a heading with its machine, the table and the same-run footnote. Contended
    rows are left out and named under the table, or kept and marked with `include_contended`."""
    sections = []
    for results in results_list:
        table = rows(results)
        contended = [row for row in table if row["contended"] and any(row[key] is not None for key in TIMED)]
        flagged = {id(row) for row in contended}
        shown = table if include_contended else [row for row in table if id(row) not in flagged]
        lines = [f"### `{results.get('report_source', 'results')}`", "", _machine(results, table), ""]
        lines.append("| " + " | ".join(title for title, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in shown:
            cells = [_cell(key, row[key]) for _, key in COLUMNS]
            if id(row) in flagged:
                cells[0] += " (contended)"
            lines.append("| " + " | ".join(cells) + " |")
        if not shown:
            lines.append("| " + " | ".join(MISSING for _ in COLUMNS) + " |")
        lines += ["", f"Ratios compare rows of this file only (the same run on the same machine): speed-ups vs "
                  f"`{NAIVE_PATH}` and `{LMGEN_PREFIX}*`, memory vs `{BATCH_PATH}` at the same T. "
                  f"{MISSING} = not recorded in the JSON (or its reference row is absent)."]
        lines += _goal_lines(results)
        if contended:
            verb = "Marked (contended)" if include_contended else "Left out"
            lines += ["", f"{verb}: other processes took CPU time from these benchmarks even after repeats, so "
                      f"their speed is not their own and no ratio uses them: "
                      + ", ".join(_contention(row) for row in contended) + "."]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _goal_lines(results: dict[str, Any]) -> list[str]:
    """"Share of the run" benchmarks against their goal: one line each, met or missed (contended ones marked)."""
    lines = []
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        fraction, goal = _num(info.get("fraction_of_run")), _num(info.get("goal_fraction"))
        if fraction is None or goal is None:
            continue
        path = info.get("path") if isinstance(info.get("path"), str) else bench["name"]
        verdict = "met" if fraction < goal else "missed"
        busy = " (contended: other processes took CPU)" if info.get("contended") is True else ""
        lines.append(f"- `{path}`: {100 * fraction:.2f} % of the run (goal < {100 * goal:g} %: {verdict}){busy}")
    return ["", "Share of the run against its goal:", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_stream.bench_report",
        description="Markdown ratio tables from pytest-benchmark JSON (pytest bench --benchmark-json=FILE).",
    )
    parser.add_argument("results", nargs="+", metavar="RESULTS.json", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", metavar="FILE.md", help="write the markdown here instead of stdout")
    parser.add_argument("--include-contended", action="store_true",
                        help="keep benchmarks that other processes slowed down in the tables, marked")
    args = parser.parse_args(argv)
    try:
        loaded = [load_results(path) for path in args.results]
    except BenchReportError as exc:
        print(f"bench_report: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(loaded, include_contended=args.include_contended)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
