"""Toy layers that do what breaks a CUDA graph replay (shared by test_graphsafe.py and test_graphs.py)."""

from __future__ import annotations

import torch
from torch import nn


class Wrapped(nn.Module):
    """Runs a transformer layer, then `self.after(y)`: the shape of a TTT layer bolted onto a moshi layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        self.after(y)
        return y

    def after(self, y: torch.Tensor) -> None:
        pass


class PythonSideTTT(Wrapped):
    """The public attempts' mistake: a Python counter and a Python list of pending updates."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.step = 0
        self.pending: list[torch.Tensor] = []

    def after(self, y: torch.Tensor) -> None:
        self.step += 1
        self.pending.append(y.mean())


class RebindingTTT(Wrapped):
    """Out-of-place updates of a registered buffer and of a plain tensor attribute."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.register_buffer("fast", torch.zeros(4))
        self.slow = torch.zeros(4)

    def after(self, y: torch.Tensor) -> None:
        self.fast = self.fast + y.mean()
        self.slow = self.slow * 0.5 + y.mean()
