"""Peak memory vs sequence length: streaming stays flat, the batch path (O(T²) attention) grows.

Each (path, T) runs in a fresh process on CPU so peaks do not mix: the peak RSS of the run (the kernel's VmHWM,
reset after the model and codes are loaded) minus the RSS at that point. On CUDA, in this process:
`torch.cuda.max_memory_allocated` after a reset.
Lengths: `FUSED_STREAM_BENCH_MEMORY_LENGTHS` (default 1000,2000,4000,8000; the CI smoke run uses 2 short ones).
CPU target (`small`): streaming peak at T=8k <= 1.05 x at T=1k, while `batch_losses` grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.verify.reference import batch_losses

PRESET = os.environ.get("FUSED_STREAM_BENCH_PRESET", "small")  # as in bench/conftest.py
FRAMES = int(os.environ.get("FUSED_STREAM_BENCH_FRAMES", "600"))
_default = "1000,2000,4000,8000" if FRAMES >= 600 else f"{FRAMES},{2 * FRAMES}"
LENGTHS = [int(t) for t in os.environ.get("FUSED_STREAM_BENCH_MEMORY_LENGTHS", _default).split(",")]
PATHS = ["chunk_C64", "frame_B1", "batch_losses"]
_peaks: dict[tuple[str, int], int] = {}

_CHILD = r"""
import json, sys, torch
from fused_stream.data.codes import generate_codes
from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.data.models import load_model
from fused_stream.verify.reference import batch_losses
preset, path, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = load_model(preset, device="cpu", seed=0)
codes = generate_codes(model, 1, T, seed=0)

def status(key):  # kB fields of /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

# Reset the kernel's peak-RSS mark (VmHWM) so building the model does not count: the peak is the run's own.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
if path == "batch_losses":
    batch_losses(model, codes)
else:
    # verify=False: verification's batch forward over a prefix that grows with the run would hide the flat curve
    StreamingEvaluator(model, EvalConfig(chunk_size=64 if path == "chunk_C64" else 1, batch_size=1,
                                         verify=False)).evaluate(codes)
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "increase": peak - base}))
"""


def _measure_cpu(path: str, T: int) -> dict:
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, PRESET, path, str(T)], capture_output=True, text=True,
                         env=env, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_cuda(model, path: str, T: int) -> dict:
    from fused_stream.data.codes import generate_codes

    codes = generate_codes(model, 1, T, seed=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if path == "batch_losses":
        batch_losses(model, codes)
    else:
        chunk = 64 if path == "chunk_C64" else 1
        StreamingEvaluator(model, EvalConfig(chunk_size=chunk, batch_size=1, verify=False)).evaluate(codes)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"base": base, "peak": peak, "increase": peak - base}


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("path", PATHS)
def test_peak_memory_vs_length(benchmark, bench_model, path, T):
    if path == "frame_B1" and bench_model.device.type == "cpu" and T > 2000:
        pytest.skip("frame mode on CPU runs ~60 frames/s: its memory is flat by the same construction as chunk mode")
    on_cuda = bench_model.device.type == "cuda"

    def measure() -> dict:
        return _measure_cuda(bench_model, path, T) if on_cuda else _measure_cpu(path, T)

    memory = benchmark.pedantic(measure, rounds=1, iterations=1)
    _peaks[(path, T)] = memory["increase"]
    first = _peaks.get((path, LENGTHS[0]))
    benchmark.extra_info.update(
        path=f"memory_{path}", preset=PRESET, T=T, B=1, device=str(bench_model.device),
        memory_source="cuda max_memory_allocated" if on_cuda else "peak RSS (fresh process)",
        # what the run adds over the loaded model and codes (the process's own peak includes building the model)
        peak_memory_bytes=memory["increase"], process_peak_bytes=memory["peak"], peak_increase_bytes=memory["increase"],
        increase_vs_shortest=(memory["increase"] / first) if first else None,
    )
