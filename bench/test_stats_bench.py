"""The cluster bootstrap at scale: 200 units x 25,000 frames (8 codebooks and text), B = 1000 resamples.

What is timed is `stats.bootstrap.statistics` with a fresh `resample_matrix`: every headline statistic (pooled
losses per stream, the window means of the combined curve, the centered `librilight_loss_{n}k`, every slope and the
per-unit slope estimator) recomputed for each resample of one model; a comparison of two models costs this twice.
Building the unit arrays from the units' PositionSums (`build_units`, two passes over the data) is measured once
beside it. Memory: `tracemalloc`'s peak during one timed call (numpy reports its buffers to it) and the unit
arrays' size. The aim: under 10 s and a few hundred MB on the 2-core CPU. The data are the statistics tests' planted
model (`tests/stats_fixtures.py`), lengths drawn in [15,000, 25,000] so the later windows thin out.
Sizes: `FUSED_STREAM_BENCH_STATS_UNITS`, `FUSED_STREAM_BENCH_STATS_FRAMES`, `FUSED_STREAM_BENCH_STATS_B`.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' data factory: one setup
from stats_fixtures import sequence_sums  # noqa: E402

from fused_stream.stats.bootstrap import Plan, resample_matrix, statistics  # noqa: E402
from fused_stream.stats.units import build_units  # noqa: E402

UNITS = int(os.environ.get("FUSED_STREAM_BENCH_STATS_UNITS") or 200)
FRAMES = int(os.environ.get("FUSED_STREAM_BENCH_STATS_FRAMES") or 25_000)
B = int(os.environ.get("FUSED_STREAM_BENCH_STATS_B") or 1000)
WINDOW, CONTEXT = 1000, 3000


def _unit(u: int):
    rng = np.random.default_rng(u)
    frames = FRAMES if u == 0 else int(rng.integers(int(0.6 * FRAMES), FRAMES + 1))
    return sequence_sums(rng, frames, codebooks=8, text=True, unit_effect=rng.normal(0, 0.3), slope=-0.02)


def test_bootstrap_200_units_25k_frames(benchmark):
    started = time.perf_counter()
    units = build_units(_unit, UNITS, context=CONTEXT, window=WINDOW)
    build_seconds = time.perf_counter() - started
    plan = Plan.make(units.frames, window=WINDOW, context=CONTEXT)

    def bootstrap():
        return statistics(units, resample_matrix(UNITS, B, 12345), plan)

    tracemalloc.start()
    values = bootstrap()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    benchmark.pedantic(bootstrap, rounds=3, iterations=1)
    arrays = sum(a.nbytes for a in (units.totals_sum, units.totals_count, units.audio_sum, units.count,
                                     units.irr_sum, units.irr_count))
    benchmark.extra_info.update(
        path="bootstrap_200x25k_B1000", units=UNITS, T=FRAMES, B=B, statistics=len(values),
        build_units_seconds=build_seconds, peak_traced_bytes=peak, unit_arrays_bytes=arrays,
        irregular_positions=len(units.irregular),
    )
    median = benchmark.stats.stats.median if benchmark.stats is not None else float("nan")
    print(f"bootstrap: {UNITS} units x {FRAMES} frames, B={B}: {median:.2f} s per model (median), "
          f"{len(values)} statistics; peak {peak / 2**20:.0f} MiB traced, unit arrays {arrays / 2**20:.0f} MiB; "
          f"build_units {build_seconds:.1f} s")
    assert all(len(v) == B for v in values.values())
