"""`ModelRun`, what every report is written from, and `check_runs`, which refuses runs that cannot be written.

A run is plain data (metrics dict, per-position numpy curves, the driver's report), so the report modules do not
depend on how the metrics were computed. `check_runs` runs before anything is rendered or written: a bad run is
named (label and field) while the previous results on disk are still untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
            raise TypeError(f"runs[{i}] is a {type(run).__name__}, expected a fused_stream.report.model_run.ModelRun")
        if not run.label or run.label in seen:
            raise ValueError(f"runs[{i}].label {run.label!r} is empty or used twice; give every model a unique label")
        seen.add(run.label)
        for name in ("combined", "count"):
            if name not in run.curves:
                raise ValueError(f"run {run.label!r}: curves lack {name!r} (have {sorted(run.curves)})")
        lengths = {name: np.shape(curve) for name, curve in run.curves.items()}
        if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
            raise ValueError(f"run {run.label!r}: curves must be 1-D arrays of one length T, got shapes {lengths}")
