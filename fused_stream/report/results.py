"""Write an evaluation run to disk: `results.json`, `per_position.csv` and `loss_curve.png`, all or none.

results.json holds what a run was (version, time, seed, configuration, environment, the data and what failed) and
each model's metrics and driver report, as strict JSON (NaN and inf become null). All three files are rendered in
memory first and each is written atomically (temporary file in the same directory, then `os.replace`): a crash
never leaves a half-written result behind, nor a stray temporary file, and results.json goes last, so its presence
means the other two belong to it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..jsonio import atomic_write, to_jsonable
from ..version import __version__
from .environment import environment_info
from .loss_plot import loss_curve_png
from .model_run import ModelRun, check_runs
from .per_position import per_position_csv
from .per_sequence import rows_csv

log = logging.getLogger(__name__)

RESULTS_JSON, PER_POSITION_CSV, LOSS_CURVE_PNG = "results.json", "per_position.csv", "loss_curve.png"
PER_SEQUENCE_CSV, PER_WINDOW_CSV = "per_sequence.csv", "per_window.csv"


def results_document(
    runs: list[ModelRun], *, config: dict[str, Any], data: list[dict[str, Any]], seed: int,
    environment: dict[str, Any], failed: list[dict[str, Any]] | None = None, bootstrap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of results.json, already strict-JSON (see `to_jsonable`). With `bootstrap` (the block
    `cli.uncertainty.bootstrap_models` returns) it also holds `bootstrap` (signature, B, seed, unit, n_units) and
    `comparisons` (each model against the baseline, per metric: delta, ci95, p_value, wins of n_units)."""
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
    if bootstrap is not None:
        doc["bootstrap"] = {k: v for k, v in bootstrap.items() if k != "comparisons"}
        doc["comparisons"] = bootstrap.get("comparisons") or []
    return to_jsonable(doc)


def write_reports(
    out_dir: str | Path,
    runs: list[ModelRun],
    *,
    config: dict[str, Any],
    data: list[dict[str, Any]],
    seed: int,
    environment: dict[str, Any] | None = None,
    failed: list[dict[str, Any]] | None = None,
    bootstrap: dict[str, Any] | None = None,
    sequences: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> dict[str, Path]:
    """Write results.json, per_position.csv and loss_curve.png into `out_dir` (created if missing).

    All three are rendered in memory first, so a failure in any of them (a bad run, the plot) writes nothing;
    results.json is written last, so its presence means the other two are from the same run. `environment`
    defaults to `environment_info` of CUDA when available, else the CPU; pass `environment_info(device)` to be
    exact. With `sequences` (per-sequence rows, per-window rows) it writes per_sequence.csv and per_window.csv too,
    and with `bootstrap` the plot gets its bands and difference panel. Returns {"json", "csv", "png"[,
    "per_sequence", "per_window"]} -> path.
    """
    check_runs(runs)
    if environment is None:
        environment = environment_info("cuda" if torch.cuda.is_available() else "cpu")
    doc = results_document(runs, config=config, data=data, seed=seed, environment=environment, failed=failed,
                           bootstrap=bootstrap)
    # allow_nan=False: a NaN that slipped past to_jsonable fails here instead of writing a non-JSON token
    json_bytes = (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()
    csv_bytes = per_position_csv(runs).encode()
    png_bytes = loss_curve_png(runs, (bootstrap or {}).get("comparisons"))
    tables = []
    if sequences is not None:
        tables = [("per_sequence", PER_SEQUENCE_CSV, rows_csv(sequences[0]).encode()),
                  ("per_window", PER_WINDOW_CSV, rows_csv(sequences[1]).encode())]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "csv": out / PER_POSITION_CSV, "png": out / LOSS_CURVE_PNG}
    for key, name, content in tables:
        paths[key] = out / name
        atomic_write(paths[key], content)
    for key, content in (("csv", csv_bytes), ("png", png_bytes), ("json", json_bytes)):
        atomic_write(paths[key], content)
    log.info("wrote %s, %s, %s to %s", RESULTS_JSON, PER_POSITION_CSV, LOSS_CURVE_PNG, out)
    return paths
