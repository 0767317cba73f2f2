"""Toy layers that do what breaks a CUDA graph replay (shared by test_graphsafe.py and test_graphs.py), and layers
whose streaming path differs from their `forward` (test_verification.py, test_api.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.modules.streaming import State, StreamingModule
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


def _running_mean_before(y: torch.Tensor, total: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """[B, T, D]: at each position, the mean of every output before it (`total` over `seen` frames before y)."""
    before = total.unsqueeze(1) + torch.cumsum(y, dim=1) - y
    count = seen + torch.arange(y.shape[1], device=y.device)
    return before / count.clamp(min=1).view(1, -1, 1).to(y.dtype)


class ForwardOnlyTTT(Wrapped):
    """Fast weights updated in `forward` only: each position adds the running mean of the outputs before it.

    Over a whole sequence (LMModel.forward) that is a causal state carried along time; nothing is kept between
    calls, so a stream restarts from the initial state every call: equal to forward on its first call only.
    """

    def __init__(self, layer: nn.Module, scale: float = 1.0) -> None:
        super().__init__(layer)
        self.scale = scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        zero = torch.zeros(y.shape[0], y.shape[2], dtype=y.dtype, device=y.device)
        return y + self.scale * _running_mean_before(y, zero, torch.zeros((), dtype=torch.long, device=y.device))


@dataclass
class _SumState(State):
    total: torch.Tensor  # [B, D] sum of the outputs streamed so far
    seen: torch.Tensor  # [] frames streamed so far

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.total.zero_()
        self.seen.zero_()


class FirstFrameCarryTTT(StreamingModule[_SumState]):
    """`ForwardOnlyTTT`'s running mean kept in moshi's streaming state, but each call carries only its first frame:
    right frame by frame (a call is one frame), wrong across chunks (the state misses frames 1..C-1 of each chunk)."""

    def __init__(self, layer: nn.Module, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.layer, self.dim, self.scale = layer, dim, scale

    def _init_streaming_state(self, batch_size: int) -> _SumState:
        device = next(self.parameters()).device
        return _SumState(batch_size, device, total=torch.zeros(batch_size, self.dim, device=device),
                         seen=torch.zeros((), dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        state = self._streaming_state
        if state is None:
            zero = torch.zeros(y.shape[0], y.shape[2], dtype=y.dtype, device=y.device)
            return y + self.scale * _running_mean_before(y, zero, torch.zeros((), dtype=torch.long, device=y.device))
        out = y + self.scale * _running_mean_before(y, state.total.to(y.dtype), state.seen)
        state.total.add_(y[:, 0].float())  # the mistake: the whole call's y[:, :].sum(1) and its length belong here
        state.seen.add_(1)
        return out


class LeakyAcrossBatches(Wrapped):
    """Right in `forward` and in its first stream, wrong after it: the running sum of its outputs lives in a buffer
    updated in place that `reset_streaming` never clears, so the next batch of the same stream starts from the
    previous batch's sum (whole-sequence forward: the causal running sum from zero)."""

    def __init__(self, layer: nn.Module, dim: int, scale: float = 0.1) -> None:
        super().__init__(layer)
        self.scale = scale
        self.register_buffer("total", torch.zeros(dim))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        before = torch.cumsum(y, dim=1) - y
        if self.layer._streaming_state is None:
            return y + self.scale * before
        out = y + self.scale * (before + self.total)
        self.total += y.sum(1).mean(0)  # in place: graph-safe, and never reset
        return out
