"""Runs for the report tests, made here, and readers of what was written.

`make_run` puts NaN, inf, numpy and torch values where real runs have them; `strict_load` refuses any non-JSON
token; `read_csv` returns the CSV's cells exactly as written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from fused_stream.report.model_run import ModelRun
from fused_stream.report.results import write_reports

NAN = float("nan")


def make_run(label: str, T: int, *, context: int = 16, text: bool = True, seed: int = 0) -> ModelRun:
    rng = np.random.default_rng(seed)
    curves = {f"codebook_{k}": rng.uniform(1.0, 8.0, T) for k in range(2)}
    curves["codebook_0"][0] = NAN  # delay: nothing scored at position 0 for codebook 0
    curves["combined"] = rng.uniform(1.0, 8.0, T) / 3.0  # non-terminating binary fractions test the round trip
    curves["combined"][0] = NAN
    if text:
        curves["text"] = rng.uniform(0.5, 2.0, T)
    curves["count"] = np.arange(T, dtype=np.int64) % 3
    metrics = {
        "flat": {"librilight_loss_8k": 2.345678, "librilight_loss_16k": NAN, "librilight_slope": -0.0123456},
        "overall": {"combined": 3.14159265, "codebook_0": 2.5, "codebook_1": np.float32(1.5)}
        | ({"text": 1.25} if text else {}),
        "windows": [
            {"start": 0, "end": T // 2, "center": T / 4, "combined": 3.0},
            {"start": T // 2, "end": T, "center": 3 * T / 4, "combined": NAN},  # all-invalid window
        ],
        "n_sequences": 2,
        "frames": T * 2,
    }
    driver_report = {
        "frames_per_second": 1234.5678,
        "seconds": float("inf"),
        "memory": {"peak_bytes": 3 * 2**29, "constant_memory": True, "slope_bytes_per_frame": NAN},
        "shape": (2, 17, T),
        "scored": torch.tensor(7),
        "dtype": torch.bfloat16,
    }
    return ModelRun(label, f"preset:{label}", 1000, context, metrics, curves, driver_report)


def write(tmp_path: Path, runs: list[ModelRun]) -> dict[str, Path]:
    return write_reports(
        tmp_path / "out", runs, config={"chunk_size": 4, "limit": NAN, "lengths": (1, 2)},
        data=[{"name": "a.flac", "frames": 6, "sources": ["x"]}], seed=7,
        environment={"torch": "2.9.1", "git_commit": None},
    )


def strict_load(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"non-JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))
