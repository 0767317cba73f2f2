"""Synthetic per-sequence PositionSums with planted truth, for the statistics tests and the benchmark.

A sequence's loss at frame t is `level + unit_effect + slope * ln(t + 1) + noise`, the noise an AR(1) process
within the sequence (`rho`: how strongly neighbouring frames are correlated) plus an independent part per codebook.
Codebooks 1.. are not scored at the last frame (the acoustic delay), which makes that position irregular.
"""

from __future__ import annotations

import numpy as np
import torch

from fused_stream.metrics import TEXT, PositionSums


def ar1(rng: np.random.Generator, n: int, rho: float, sd: float) -> np.ndarray:
    """n frames of an AR(1) process with stationary standard deviation sd."""
    e = rng.normal(0.0, sd * np.sqrt(1 - rho**2), n)
    if rho == 0.0:
        return rng.normal(0.0, sd, n)
    x = np.empty(n)
    x[0] = rng.normal(0.0, sd)
    for t in range(1, n):  # small n in tests; the benchmark uses rho = 0
        x[t] = rho * x[t - 1] + e[t]
    return x


def sequence_sums(rng: np.random.Generator, frames: int, *, codebooks: int = 2, level: float = 3.0,
                  unit_effect: float = 0.0, slope: float = 0.0, rho: float = 0.0, sd: float = 0.3,
                  codebook_sd: float = 0.1, text: bool = False) -> PositionSums:
    t = np.arange(frames)
    shared = level + unit_effect + slope * np.log(t + 1.0) + ar1(rng, frames, rho, sd)
    losses = shared[None, :] + rng.normal(0.0, codebook_sd, (codebooks, frames))
    valid = np.ones((codebooks, frames), dtype=bool)
    valid[1:, -1] = False  # delayed codebooks: the last frame has no target
    text_row = rng.uniform(1.0, 2.0, frames) if text else np.zeros(frames)
    sums = np.concatenate([np.where(valid, losses, 0.0), text_row[None]], axis=0)
    counts = np.concatenate([valid, np.full((1, frames), text)], axis=0).astype(np.int64)
    names = [f"codebook_{k}" for k in range(codebooks)] + [TEXT]
    return PositionSums(names, torch.from_numpy(sums), torch.from_numpy(counts), 1)


def pooled(sequences: list[PositionSums]) -> PositionSums:
    total = PositionSums.empty(list(sequences[0].names))
    for s in sequences:
        total = total.add(s)
    return total
