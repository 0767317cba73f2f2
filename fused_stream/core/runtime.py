"""The context every evaluation path runs a model in: eval mode (restored after), no autograd, no inductor on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
