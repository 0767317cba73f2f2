"""Write an evaluation run to disk: `results.json`, `per_position.csv`, `loss_curve.png`, and a stdout table.

Inputs are plain data (`ModelRun`: metrics dict, per-position numpy curves, the driver's report), so this module
does not depend on how the metrics were computed. Every file is written atomically (temporary file in the same
directory, then `os.replace`): a crash never leaves a half-written result behind, nor a stray temporary file.

CSV columns: `position`, then for each model in order, its curves in the order codebook_0..codebook_{n-1},
combined, weighted (if present), text (if present), any other curves (sorted), count. With a single model the
column is the curve name (`combined`); with several models it is `{label}:{curve}` (`ttt:combined`). One row per
position 0..T-1, T = the longest run; NaN and positions past a shorter run's end are empty cells.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..version import __version__

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn: the rest of this module must not need it
    from matplotlib.figure import Figure

__all__ = [
    "ModelRun", "environment_info", "git_commit", "plot_loss_curves", "summary_table", "to_jsonable", "write_reports",
]

log = logging.getLogger(__name__)

RESULTS_JSON, PER_POSITION_CSV, LOSS_CURVE_PNG = "results.json", "per_position.csv", "loss_curve.png"
_CODEBOOK = re.compile(r"codebook_(\d+)")
_DASH = "—"  # the table's "not available" cell


@dataclass
class ModelRun:
    """One evaluated model: what it is, its metrics, its per-position curves and the driver's report."""

    label: str  # unique within a report, e.g. "baseline" / "ttt"
    spec: str  # preset name or checkpoint path as given
    parameters: int
    context: int  # attention context in frames (marked on the plot)
    metrics: dict[str, Any]  # "flat", "overall", "windows", "n_sequences", "frames" (see metrics.py)
    curves: dict[str, np.ndarray]  # per-position [T] curves: codebook_k, combined, weighted?, text?, count
    driver_report: dict[str, Any]  # EvalResult.report of the run

    def length(self) -> int:
        return len(self.curves["combined"])


def check_runs(runs: list[ModelRun]) -> None:
    """Raise ValueError naming the run and field when the runs cannot be written (before any file is touched)."""
    if not runs:
        raise ValueError("write_reports: `runs` is empty; pass at least one ModelRun")
    seen: set[str] = set()
    for i, run in enumerate(runs):
        if not isinstance(run, ModelRun):
            raise TypeError(f"runs[{i}] is a {type(run).__name__}, expected a fused_stream.report.ModelRun")
        if not run.label or run.label in seen:
            raise ValueError(f"runs[{i}].label {run.label!r} is empty or used twice; give every model a unique label")
        seen.add(run.label)
        for name in ("combined", "count"):
            if name not in run.curves:
                raise ValueError(f"run {run.label!r}: curves lack {name!r} (have {sorted(run.curves)})")
        lengths = {name: np.shape(curve) for name, curve in run.curves.items()}
        if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
            raise ValueError(f"run {run.label!r}: curves must be 1-D arrays of one length T, got shapes {lengths}")


# ---------------------------------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any, where: str = "$") -> Any:
    """A strict-JSON copy of `obj`: NaN/inf -> None, numpy/torch scalars and arrays -> Python, tuples -> lists.

    Unknown objects become their `str()` with a warning rather than an error: this runs after a long evaluation,
    and losing the results over one odd field in a report would be the worse outcome.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.dim() else obj.item(), where)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj  # sets have no stable order
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    log.warning("%s: %s is not JSON data; writing its str()", where, type(obj).__name__)
    return str(obj)


def _json_key(key: Any) -> str:
    return key if isinstance(key, str) else str(to_jsonable(key))


def results_document(
    runs: list[ModelRun], *, config: dict[str, Any], data: list[dict[str, Any]], seed: int,
    environment: dict[str, Any], failed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of results.json, already strict-JSON (see `to_jsonable`)."""
    doc = {
        "fused_stream_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "environment": environment,
        "data": data,
        "failed": failed or [],  # files or sequences left out, each with its reason
        "models": [
            {
                "label": run.label, "spec": run.spec, "parameters": run.parameters, "context": run.context,
                "metrics": run.metrics, "report": run.driver_report,
            }
            for run in runs
        ],
    }
    return to_jsonable(doc)


# ---------------------------------------------------------------------------------------------------- CSV


def curve_order(curves: dict[str, np.ndarray]) -> list[str]:
    """Curve names in CSV order: codebook_0..n-1 (numerically), combined, weighted, text, others sorted, count."""
    codebooks = sorted((n for n in curves if _CODEBOOK.fullmatch(n)), key=lambda n: int(n.split("_")[1]))
    named = [n for n in ("combined", "weighted", "text") if n in curves]
    rest = sorted(set(curves) - set(codebooks) - set(named) - {"count"})
    return codebooks + named + rest + ["count"]


def _cell(value: Any) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    # repr is the shortest string that parses back to the same float64: exact round trip, no fixed digit count
    return "" if math.isnan(value) else repr(value)


def per_position_csv(runs: list[ModelRun]) -> str:
    """The content of per_position.csv (column scheme in the module docstring)."""
    prefix = len(runs) > 1
    columns: list[tuple[str, np.ndarray]] = []
    for run in runs:
        for name in curve_order(run.curves):
            columns.append((f"{run.label}:{name}" if prefix else name, np.asarray(run.curves[name])))
    T = max(run.length() for run in runs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["position"] + [name for name, _ in columns])
    for t in range(T):
        writer.writerow([t] + [_cell(values[t]) if t < len(values) else "" for _, values in columns])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- plot


def plot_loss_curves(runs: list[ModelRun]) -> Figure:
    """Combined loss vs position for every run on one log-x axis: raw per-position line, window means, context.

    The figure is built without pyplot and drawn by an explicit Agg canvas: that is headless by construction and,
    unlike `matplotlib.use("Agg")`, does not switch the backend of a notebook or GUI session that imported us.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_runs(runs)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        y = np.asarray(run.curves["combined"], dtype=np.float64)
        # position 0 has no place on a log axis (log 0 = -inf): the raw curve starts at position 1
        x = np.arange(len(y))
        ax.plot(x[1:], y[1:], color=color, linewidth=0.6, alpha=0.45, label=run.label)
        centers, means = _window_points(run)
        if centers:
            ax.plot(centers, means, color=color, linewidth=2.0, marker="o", markersize=4,
                    label=f"{run.label} (window means)")
    contexts = [run.context for run in runs]
    if len(set(contexts)) == 1:
        ax.axvline(contexts[0], color="0.3", linestyle="--", linewidth=1.0,
                   label=f"attention context ({contexts[0]} frames)")
    else:
        for run, color in zip(runs, colors, strict=True):
            ax.axvline(run.context, color=color, linestyle="--", linewidth=1.0,
                       label=f"{run.label}: attention context ({run.context} frames)")
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, max(run.length() for run in runs), max(contexts) * 1.1))
    ax.set_xlabel("frame position (12.5 frames/s, log scale)")
    ax.set_ylabel("combined teacher-forced cross-entropy (nats)")
    ax.set_title(f"Loss vs position ({_sequences_text(runs)})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best", fontsize="small")
    return fig


def _window_points(run: ModelRun) -> tuple[list[float], list[float]]:
    """(center, combined) of the run's windows with a finite mean and a positive center (log axis)."""
    points = []
    for window in run.metrics.get("windows") or []:
        center, value = window.get("center"), window.get("combined")
        if center is not None and value is not None and center > 0 and math.isfinite(value):
            points.append((float(center), float(value)))
    return [c for c, _ in points], [v for _, v in points]


def _sequences_text(runs: list[ModelRun]) -> str:
    counts = [run.metrics.get("n_sequences") for run in runs]
    if len(set(counts)) == 1:
        return f"{counts[0]} sequences"
    return ", ".join(f"{run.label}: {n} sequences" for run, n in zip(runs, counts, strict=True))


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- files


def atomic_write(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temporary file in the same directory and `os.replace`.

    Same directory, because `os.replace` is atomic only within one file system. The temporary file is removed
    on any error, so a failure leaves the previous file (if any) untouched and nothing else behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # os.replace may have consumed it already
            os.unlink(tmp)
        raise


def write_reports(
    out_dir: str | Path,
    runs: list[ModelRun],
    *,
    config: dict[str, Any],
    data: list[dict[str, Any]],
    seed: int,
    environment: dict[str, Any] | None = None,
    failed: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write results.json, per_position.csv and loss_curve.png into `out_dir` (created if missing).

    All three are rendered in memory first, so a failure in any of them (a bad run, the plot) writes nothing;
    results.json is written last, so its presence means the other two are from the same run. `environment`
    defaults to `environment_info` of CUDA when available, else the CPU; pass `environment_info(device)` to be
    exact. Returns {"json", "csv", "png"} -> path.
    """
    check_runs(runs)
    if environment is None:
        environment = environment_info("cuda" if torch.cuda.is_available() else "cpu")
    doc = results_document(runs, config=config, data=data, seed=seed, environment=environment, failed=failed)
    # allow_nan=False: a NaN that slipped past to_jsonable fails here instead of writing a non-JSON token
    json_bytes = (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()
    csv_bytes = per_position_csv(runs).encode()
    png_bytes = _png_bytes(plot_loss_curves(runs))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "csv": out / PER_POSITION_CSV, "png": out / LOSS_CURVE_PNG}
    for key, content in (("csv", csv_bytes), ("png", png_bytes), ("json", json_bytes)):
        atomic_write(paths[key], content)
    log.info("wrote %s, %s, %s to %s", RESULTS_JSON, PER_POSITION_CSV, LOSS_CURVE_PNG, out)
    return paths


# ---------------------------------------------------------------------------------------------------- table


def summary_table(runs: list[ModelRun]) -> str:
    """A fixed-width text table, one column per model, for stdout. Absent or non-finite values show as "—"."""
    has_text = any("text" in (run.metrics.get("overall") or {}) for run in runs)
    rows: list[tuple[str, Callable[[ModelRun], str]]] = [
        ("frames", lambda r: _fmt(r.metrics.get("frames"), "{:,}")),
        ("sequences", lambda r: _fmt(r.metrics.get("n_sequences"), "{:,}")),
        ("loss combined", lambda r: _fmt((r.metrics.get("overall") or {}).get("combined"), "{:.4f}")),
    ]
    if has_text:
        rows.append(("loss text", lambda r: _fmt((r.metrics.get("overall") or {}).get("text"), "{:.4f}")))
    for key in ("librilight_loss_8k", "librilight_loss_16k", "librilight_loss_24k"):
        rows.append((key, lambda r, key=key: _fmt((r.metrics.get("flat") or {}).get(key), "{:.4f}")))
    rows += [
        ("librilight_slope", lambda r: _fmt((r.metrics.get("flat") or {}).get("librilight_slope"), "{:+.5f}")),
        ("frames/s", lambda r: _fmt(r.driver_report.get("frames_per_second"), "{:,.1f}")),
        ("peak memory", lambda r: _bytes((r.driver_report.get("memory") or {}).get("peak_bytes"))),
        ("constant memory", lambda r: _verdict((r.driver_report.get("memory") or {}).get("constant_memory"))),
    ]
    header = [""] + [run.label for run in runs]
    body = [[name] + [cell(run) for run in runs] for name, cell in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in body])


def _fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return _DASH
    if not math.isfinite(value):
        return _DASH
    return spec.format(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        return _DASH
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _verdict(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "NO (grows)"
    return "unknown"  # None: too few samples after warm-up to judge (see monitor.constant_memory_check)


# ---------------------------------------------------------------------------------------------------- environment


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
