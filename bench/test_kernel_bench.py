"""Per-step loss of the driver: the fused kernel (or its torch twin on CPU) vs a plain torch path.

A step of Moshi's shapes: B*C*8 audio rows of 2048 logits and B*C text rows of 32000. The plain path is what a
user writes: `F.cross_entropy(x.float(), reduction="none")` per stream, masking, an index write into the buffer.
On CPU only the twin and the plain path run (Triton's interpreter is not a speed path); on CUDA the kernel runs
too and `extra_info` records achieved GB/s (logit bytes read per second). One step's logits are ~1 MB: a sync after
each call would time the launch latency, so each round is CALLS_PER_ROUND calls back to back and one sync, and
`GB_per_s` comes from CUDA events around >= 0.1 s of calls (`gpu_check.kernel_timing.time_per_call`).
"""

from __future__ import annotations

import pytest
import torch

from fused_stream.gpu_check.kernel_timing import loss_step_inputs, plain_torch_step, time_per_call
from fused_stream.kernels import backends

DEP_Q = 8
SHAPES = [(8, 1), (8, 16)]  # (B, C)
CALLS_PER_ROUND = 50  # on CUDA: back to back, one sync per round


def _timed(fn, device):
    calls = CALLS_PER_ROUND if device.type == "cuda" else 1

    def run():
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run, calls


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("path", ["fused", "plain_torch"])
def test_step_loss(benchmark, path, B, C):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = loss_step_inputs(B, C, device, small=False)  # Moshi's vocabularies: 2048 audio, 32000 text
    text, audio = args[0], args[1]
    if path == "fused":
        backend = "triton" if device.type == "cuda" else "torch"  # CPU: the twin (the interpreter is not a speed path)
        call = lambda: backends.step_cross_entropy_(*args, lead=1, backend=backend)  # noqa: E731
    else:
        backend = "plain"
        call = lambda: plain_torch_step(*args, lead=1)  # noqa: E731
    fn, calls = _timed(call, device)
    fn()  # warm-up: kernel compilation, allocator
    logit_bytes = text.numel() * text.element_size() + audio.numel() * audio.element_size()
    benchmark.extra_info.update(
        path=path, backend=backend, B=B, C=C, rows=B * C * (1 + DEP_Q), logit_bytes=logit_bytes,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=str(text.dtype),
    )
    benchmark.pedantic(fn, rounds=20 if device.type == "cuda" else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_round"] = calls
    seconds, timed = time_per_call(call, device)  # CUDA events on the GPU, over >= 0.1 s of calls
    benchmark.extra_info.update(seconds_per_call=seconds, calls_timed=timed, GB_per_s=logit_bytes / seconds / 1e9)
