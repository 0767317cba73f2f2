"""End-to-end evaluation speed: the seed's per-frame loop vs frame mode vs chunk mode (C=64, auto) vs the batch path.

Run with `pytest bench --benchmark-only`. Streaming runs with `verify=False`: these rows time the engine; what
verification adds to a run is `test_verify_bench.py`'s. Targets on the 2-core CPU (small preset, T=600, same run):
chunk mode C=64 (B=1) >= 15x the naive loop, frame mode at B=8 >= 2.5x.
"""

from __future__ import annotations

from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.verify.reference import batch_losses, naive_streaming_losses


def test_naive_streaming(run_case, bench_model):
    run_case("naive_streaming", lambda codes: naive_streaming_losses(bench_model, codes), batch=1, rounds=2)


def test_frame_mode_b8(run_case, bench_model):
    evaluator = StreamingEvaluator(bench_model, EvalConfig(chunk_size=1, verify=False))
    run_case("frame_mode_B8", evaluator.evaluate, batch=8, rounds=2)


def test_chunk_mode_c64(run_case, bench_model):
    evaluator = StreamingEvaluator(bench_model, EvalConfig(chunk_size=64, verify=False))
    run_case("chunk_mode_C64", evaluator.evaluate, batch=1, rounds=5)


def test_batch_losses(run_case, bench_model):
    run_case("batch_losses", lambda codes: batch_losses(bench_model, codes), batch=1)


def test_chunk_mode_auto(run_case, bench_model):
    """chunk_size="auto": the chunk the preflight picks for this length (T=600: 3 balanced steps of 200)."""
    evaluator = StreamingEvaluator(bench_model, EvalConfig(chunk_size="auto", verify=False))
    run_case("chunk_mode_auto", evaluator.evaluate, batch=1, rounds=5)


def test_chunk_mode_c64_b8(run_case, bench_model):
    evaluator = StreamingEvaluator(bench_model, EvalConfig(chunk_size=64, verify=False))
    run_case("chunk_mode_C64_B8", evaluator.evaluate, batch=8, rounds=2)
