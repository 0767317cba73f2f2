"""The torch twin of the fused step loss: runs on every device, the reference of the Triton kernel's tests."""

from __future__ import annotations

import torch

from ..cross_entropy import step_cross_entropy_torch_
from . import LossBackend, register


def _unavailable(device: torch.device) -> str | None:
    return None


def _extra_bytes(logits: int, itemsize: int) -> int:
    # F.cross_entropy's fp32 log-softmax of every row, plus the fp32 copy of bf16/fp16 logits it reads.
    return logits * (4 + (4 if itemsize != 4 else 0))


BACKEND = register(LossBackend(name="torch", summary="torch", step=step_cross_entropy_torch_,
                               unavailable=_unavailable, extra_bytes=_extra_bytes))
