"""The context every evaluation path runs a model in: eval mode (restored after), no autograd, no inductor on CPU;
and `InstanceShadows`, how a stream swaps one method of some moshi modules for its own and puts moshi's back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from moshi.utils.compile import no_compile


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to eval mode and back; no grad; moshi's lazy `torch.compile` off unless on CUDA.

    moshi compiles small helpers (RMS norm, rope, gating) with inductor on first call; on CPU that costs
    minutes of compilation for no gain, so it is disabled there with moshi's own `no_compile()`.
    """
    # Every module's own flag: model.train(was_training) would flatten a frozen submodule kept in eval mode.
    modes = [(module, module.training) for module in model.modules()]
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if device.type != "cuda":
            stack.enter_context(no_compile())
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


_ABSENT = object()


class InstanceShadows:
    """Per-instance shadows of one attribute of some modules (never the class): installed all or none, and
    restored exactly, a pre-existing instance attribute (another wrapper) included."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._saved: list[tuple[torch.nn.Module, Any]] = []

    def __bool__(self) -> bool:
        return bool(self._saved)

    def install(self, values: dict[torch.nn.Module, Any]) -> None:
        try:
            for module, value in values.items():
                self._saved.append((module, module.__dict__.get(self.name, _ABSENT)))
                setattr(module, self.name, value)
        except BaseException:  # e.g. Ctrl-C half way: leave the modules exactly as they were
            self.restore()
            raise

    def restore(self) -> None:
        while self._saved:
            module, previous = self._saved.pop()
            if previous is _ABSENT:
                del module.__dict__[self.name]
            else:
                module.__dict__[self.name] = previous
