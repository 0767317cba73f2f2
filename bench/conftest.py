"""Shared set-up for the benchmarks: one model and one input factory per case, and a ratio table at the end.

Sizes: `FUSED_STREAM_BENCH_PRESET` (default `moshi-7b` in bf16 on a GPU, `small` on the CPU),
`FUSED_STREAM_BENCH_FRAMES` (default 600) frames and
`FUSED_STREAM_BENCH_DEVICE` (default: cuda if available, else cpu; the model runs in that device's default dtype).
Speed is reported as frames/s and as a ratio to the naive per-frame loop measured in the same run.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import fused_stream
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import count_parameters, default_device, load_model

DEVICE = os.environ.get("FUSED_STREAM_BENCH_DEVICE") or None
_ON_GPU = (DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
PRESET = os.environ.get("FUSED_STREAM_BENCH_PRESET") or ("moshi-7b" if _ON_GPU else "small")  # sizes follow the device
FRAMES = int(os.environ.get("FUSED_STREAM_BENCH_FRAMES", "600"))
_frames_per_second: dict[str, float] = {}


@pytest.fixture(scope="session")
def bench_model():
    return load_model(PRESET, device=DEVICE or default_device(), seed=0)


@pytest.fixture(scope="session")
def bench_codes(bench_model):
    """bench_codes(B) -> [B, K, FRAMES] codes, the same for every path of a run."""
    cache: dict[int, torch.Tensor] = {}

    def make(batch: int) -> torch.Tensor:
        if batch not in cache:
            cache[batch] = generate_codes(bench_model, batch, FRAMES, seed=0)
        return cache[batch]

    return make


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@pytest.fixture
def run_case(benchmark, bench_model, bench_codes):
    """run_case(name, fn, batch, rounds): time fn(codes) on [batch, K, FRAMES] codes; frames/s into extra_info."""

    def run(name: str, fn, batch: int, rounds: int = 3):
        codes = bench_codes(batch)
        fn(codes[:, :, :32])  # warm-up on a short input: allocator, kernels, lazy init
        benchmark.extra_info.update(
            path=name, preset=PRESET, parameters=count_parameters(bench_model),
            device=device_name(bench_model.device),
            dtype=str(bench_model.dtype), B=batch, T=FRAMES, frames=batch * FRAMES,
            versions={"fused_stream": fused_stream.__version__, "torch": torch.__version__},
        )
        result = benchmark.pedantic(fn, args=(codes,), rounds=rounds, iterations=1)
        report = getattr(result, "report", None) or {}  # streaming runs: the driver's own memory monitor
        memory = report.get("memory") or {}
        benchmark.extra_info.update(
            C=report.get("chunk_size", benchmark.extra_info.get("C")),
            peak_memory_bytes=memory.get("peak_bytes", benchmark.extra_info.get("peak_memory_bytes")),
            memory_source=memory.get("memory_source"),
        )
        if benchmark.stats is not None:  # None under --benchmark-disable
            fps = batch * FRAMES / benchmark.stats.stats.median
            benchmark.extra_info["frames_per_second"] = fps
            _frames_per_second[name] = fps
        return result

    return run


def pytest_terminal_summary(terminalreporter) -> None:
    if not _frames_per_second:
        return
    base = _frames_per_second.get("naive_streaming")
    terminalreporter.write_sep("-", f"frames/s, {PRESET} preset, T={FRAMES} (ratios vs the naive loop, same run)")
    for name, fps in _frames_per_second.items():
        ratio = f"{fps / base:6.2f}x" if base else "   n/a"
        terminalreporter.write_line(f"{name:>24}: {fps:10.1f} frames/s  {ratio}")
