"""Per-step cross-entropy in torch, shaped for the streaming driver.

One call per step covers all rows of that step; it never leaves the device and never syncs the host.
The fused Triton kernel of `fused_stream.kernels` will implement the same contract.
"""

from __future__ import annotations

import torch


def rowwise_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` [..., V] against `targets` [...], in float32.

    Rows whose target lies outside [0, V) (zero token, initial token, padding) get NaN, never 0.0.
    """
    V = logits.shape[-1]
    x = logits.float()  # bf16/fp16 logits accumulate in fp32
    valid = (targets >= 0) & (targets < V)
    picked = x.gather(-1, targets.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    loss = torch.logsumexp(x, dim=-1) - picked
    return torch.where(valid, loss, torch.full_like(loss, float("nan")))
