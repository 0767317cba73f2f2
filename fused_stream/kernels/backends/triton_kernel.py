"""The fused Triton kernel of the step loss: one launch per step, reads the logits in place (no extra bytes)."""

from __future__ import annotations

import torch

from ..cross_entropy import launch_triton, triton_available, triton_interpreted
from . import LossBackend, register


def _unavailable(device: torch.device) -> str | None:
    if not triton_available():
        return "loss_backend='triton' needs the triton package (it ships with torch on Linux)"
    if device.type != "cuda" and not triton_interpreted():
        return ("loss_backend='triton' on the CPU runs only under Triton's interpreter: set TRITON_INTERPRET=1 before "
                "fused_stream is imported (it is slow; use loss_backend='torch' for CPU speed)")
    if device.type == "cuda" and triton_interpreted():
        return "TRITON_INTERPRET=1 is set: unset it to run the Triton kernel on the GPU"
    return None


def _extra_bytes(logits: int, itemsize: int) -> int:
    return 0  # the kernel reads the logits in place and keeps one row's running sums in registers


BACKEND = register(LossBackend(name="triton", summary="fused Triton kernel", step=launch_triton,
                               unavailable=_unavailable, extra_bytes=_extra_bytes, auto_devices=("cuda",),
                               auto_priority=1))
