"""What verification on by default costs: `report["verification"]["fraction_of_run"]` of a 2000-frame run.

Two sequences of 1000 frames (one batch of 2: both verified sequences in it, and streaming at B=2 is cheaper per
frame than at B=1, so the fraction is the larger of the two layouts) of the bench preset, in chunk mode C=64 and in
frame mode. Requirement: under 5% of the run's time on a run of >= 2000 frames. `FUSED_STREAM_BENCH_FRAMES` sets the
frames per sequence (CI's smoke size: the assertion is skipped below 2000 frames in all).
"""

from __future__ import annotations

import os

import pytest

from fused_stream.core.config import EvalConfig
from fused_stream.core.driver import StreamingEvaluator
from fused_stream.data.codes import generate_codes

SEQUENCES = 2
FRAMES = int(os.environ.get("FUSED_STREAM_BENCH_FRAMES") or 1000)  # per sequence
MAX_FRACTION = 0.05


@pytest.mark.parametrize("chunk", [64, 1], ids=["chunk_C64", "frame"])
def test_verification_fraction_of_run(benchmark, bench_model, chunk):
    codes = generate_codes(bench_model, SEQUENCES, FRAMES, seed=0)
    evaluator = StreamingEvaluator(bench_model, EvalConfig(chunk_size=chunk))
    evaluator.evaluate(codes[:, :, :32])  # warm-up on a short input: allocator, kernels, lazy init
    result = benchmark.pedantic(evaluator.evaluate, args=(codes,), rounds=3 if chunk > 1 else 1, iterations=1)
    verification = result.report["verification"]
    assert verification["passed"]
    benchmark.extra_info.update(
        path=f"verify_{'chunk_C64' if chunk > 1 else 'frame'}", C=chunk, B=SEQUENCES, T=FRAMES,
        frames=SEQUENCES * FRAMES, dtype=str(bench_model.dtype), device=str(bench_model.device),
        run_seconds=result.report["seconds"], verification=verification,
        fraction_of_run=verification["fraction_of_run"],
    )
    print(f"verification, C={chunk}: {100 * verification['fraction_of_run']:.2f}% of a "
          f"{result.report['seconds']:.2f} s run")
    if SEQUENCES * FRAMES >= 2000:
        assert verification["fraction_of_run"] < MAX_FRACTION, verification

