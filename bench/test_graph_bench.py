"""Eager vs CUDA-graphed streaming: frame mode at B in {1, 8, 32} and chunk mode C=64, side by side in one run.

CPU: eager only (graph cases skip). GPU: run with `FUSED_STREAM_BENCH_PRESET=moshi-7b` (bf16). Targets on an H100
(measured only where a GPU is lent): graphed >= 2x eager at B=1; frame mode >= 60 % of the bandwidth roofline at
the best B; chunk mode >= 40 % MFU. Each case records frames/s, the roofline ratio or MFU, peak memory and the
constant-memory verdict in `extra_info`, and `loop_frames_per_second`: frames over the batch loops' wall time only
(capture left out, each loop ended by the host copy that waits for the GPU), with its roofline ratio (the KV bytes
the steps read: `kv_read_fraction` of the ring) — a 600-frame run spends a visible share of its time capturing.
"""

from __future__ import annotations

import pytest

from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator

CASES = [(1, 1), (1, 8), (1, 32), (64, 1)]  # (chunk, batch)


@pytest.mark.parametrize("graphs", ["off", "on"], ids=["eager", "graphed"])
@pytest.mark.parametrize("chunk,batch", CASES, ids=[f"C{c}-B{b}" for c, b in CASES])
def test_graphs(run_case, benchmark, bench_model, graphs, chunk, batch):
    if graphs == "on" and bench_model.device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    mode = "frame" if chunk == 1 else f"chunk_C{chunk}"
    name = f"{'graphed' if graphs == 'on' else 'eager'}_{mode}_B{batch}"
    # verify=False: the engine's speed and memory (verification's cost: test_verify_bench.py)
    config = EvalConfig(chunk_size=chunk, batch_size=batch, cuda_graphs=graphs, verify=False)
    result = run_case(name, StreamingEvaluator(bench_model, config).evaluate, batch=batch,
                      rounds=1 if batch >= 32 else 2)
    report = result.report
    throughput, memory = report["throughput"], report["memory"]
    graphs = report["cuda_graphs"]
    loop = graphs["graphed_seconds"] + graphs["eager_seconds"]
    loop_rate = report["frames"] / loop if loop > 0 else None
    bound = throughput.get("roofline_frames_per_second")
    benchmark.extra_info.update(
        loop_frames_per_second=loop_rate,
        loop_roofline_ratio=loop_rate / bound if loop_rate and bound else None,
        kv_read_fraction=throughput.get("kv_read_fraction"),
        cuda_graphs=graphs,
        steady_frames_per_second=throughput.get("steady_frames_per_second"),
        roofline_ratio=throughput.get("roofline_ratio"),
        mfu=throughput.get("mfu"),
        peak_memory_bytes=memory.get("peak_bytes"),
        memory_source=memory.get("memory_source"),
        torch_max_allocated_bytes=memory.get("torch_max_allocated_bytes"),
        constant_memory=memory.get("constant_memory"),
        preflight_estimate_bytes=report["preflight"]["estimate"]["total"],
    )
