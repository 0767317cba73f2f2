"""Frame mode with and without a TTT-Linear layer (2 temporal layers, mini-batch 16), side by side in one run.

CPU: `small`, eager. GPU: `FUSED_STREAM_BENCH_PRESET=moshi-7b`, graphed (the TTT layer's updates are device-side,
so the step captures). `extra_info["ttt_overhead"]` = frames/s without TTT / frames/s with TTT, same run.
"""

from __future__ import annotations

import copy

import pytest

from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.ttt.layer import attach_ttt
from fused_stream.ttt.tracker import ttt_hooks

_fps: dict[bool, float] = {}


@pytest.fixture(scope="module")
def ttt_model(bench_model):
    model = copy.deepcopy(bench_model)  # the same weights, plus TTT
    layers = [len(model.transformer.layers) // 2, len(model.transformer.layers) - 1]
    return attach_ttt(model, layers=layers, mini_batch=16, seed=0)


@pytest.mark.parametrize("with_ttt", [False, True], ids=["without_ttt", "with_ttt"])
def test_frame_mode_ttt_overhead(run_case, benchmark, bench_model, ttt_model, with_ttt):
    model = ttt_model if with_ttt else bench_model
    name = f"frame_B8_{'ttt' if with_ttt else 'plain'}"
    evaluator = StreamingEvaluator(model, EvalConfig(chunk_size=1, batch_size=8, verify=False), hooks=ttt_hooks(model))
    result = run_case(name, evaluator.evaluate, batch=8, rounds=1)
    benchmark.extra_info["cuda_graphs"] = result.report["cuda_graphs"]["reason"]
    fps = benchmark.extra_info.get("frames_per_second")
    if fps is not None:
        _fps[with_ttt] = fps
        if with_ttt and False in _fps:
            benchmark.extra_info["ttt_overhead"] = _fps[False] / fps
    if with_ttt:
        benchmark.extra_info["ttt"] = result.report["ttt"]["layers"]
