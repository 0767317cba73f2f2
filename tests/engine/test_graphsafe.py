"""The graph-safety check: the plain tiny model passes; toy TTT layers that a CUDA graph replay would break are
caught by attribute and kind; moshi's harmless `offset_cpu` is reported with its reason, not as unsafe."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from moshi.modules.streaming import State, StreamingModule
from torch import nn
from toy_layers import PythonSideTTT, RebindingTTT, Wrapped

from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import load_model
from fused_stream.engine.graphsafe import check_stream
from fused_stream.engine.stream import Stream
from fused_stream.patches.state_snapshot import Finding, format_findings, harmless_reason, unsafe

T = 20


@pytest.fixture
def model():
    # A fresh model per test: the toys below are attached in place (the session-wide tiny_model stays clean).
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=0)


def kinds(findings: list[Finding], module: str) -> dict[str, set[str]]:
    """attribute -> kinds found on `module`."""
    out: dict[str, set[str]] = {}
    for finding in findings:
        if finding.module == module:
            out.setdefault(finding.attribute, set()).add(finding.kind)
    return out


class InPlaceTTT(Wrapped):
    """The safe variant: the same update, in place."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.register_buffer("fast", torch.zeros(4))

    def after(self, y: torch.Tensor) -> None:
        self.fast.add_(y.mean())


class GrowingTTT(Wrapped):
    """A history that grows by concatenation: new tensor and new shape every step."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.history = torch.zeros(0)

    def after(self, y: torch.Tensor) -> None:
        self.history = torch.cat([self.history, y.mean().view(1)])


@dataclass
class _ToyState(State):
    fast: torch.Tensor
    count: int = 0

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.fast.zero_()
        self.count = 0


class StatefulTTT(StreamingModule[_ToyState]):
    """moshi's streaming idiom done wrong: a Python counter and a rebound tensor inside the streaming state."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def _init_streaming_state(self, batch_size: int) -> _ToyState:
        return _ToyState(batch_size, torch.device("cpu"), fast=torch.zeros(batch_size))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        state = self._streaming_state
        if state is not None:
            state.count += y.shape[1]
            state.fast = state.fast + y.mean(dim=(1, 2))
        return y


def check_graph_safety(model, codes: torch.Tensor, *, chunk_size: int, steps: int) -> list[Finding]:
    """What the driver does before its first capture: open a Stream on `codes` [B, K, T], `check_stream` it."""
    B, _, T = codes.shape
    with inference_mode(model):
        stream = Stream(model, B, chunk_size, T, backend="torch")
        try:
            stream.load(codes, torch.full((B,), T, dtype=torch.long))
            return check_stream(stream, steps)
        finally:
            stream.close()


def _check(model, chunk_size: int = 1, steps: int = 3):
    """The check on 2 generated sequences exactly `steps` calls long."""
    return check_graph_safety(model, generate_codes(model, 2, steps * chunk_size), chunk_size=chunk_size, steps=steps)


def attach(model, index: int, toy: type) -> nn.Module:
    layers = model.transformer.layers
    layers[index] = toy(layers[index])
    return layers[index]


@pytest.mark.parametrize("chunk", [1, 4])
def test_plain_tiny_model_is_graph_safe(model, chunk):
    codes = generate_codes(model, 2, T)
    findings = check_graph_safety(model, codes, chunk_size=chunk, steps=3)
    assert unsafe(findings) == [], format_findings(findings)
    # What does move is moshi's host-side offset_cpu, in every temporal layer and its attention, with a reason.
    moved = {(f.module, f.attribute, f.kind) for f in findings}
    for i in range(len(model.transformer.layers)):
        for module in (f"transformer.layers.{i}", f"transformer.layers.{i}.self_attn"):
            assert (module, "_streaming_state.offset_cpu", "python_value") in moved
    assert all(f.harmless and "offset_cpu" in f.harmless for f in findings)
    assert all(f"{3 * chunk}" in f.detail for f in findings)  # 0 -> C -> 2C -> 3C
    assert model._streaming_state is None  # the check leaves streaming mode


def test_python_side_counter_and_list_are_caught(model):
    attach(model, 0, PythonSideTTT)
    findings = unsafe(_check(model, steps=3))
    assert kinds(findings, "transformer.layers.0") == {"step": {"python_value"}, "pending": {"python_value"}}
    step = next(f for f in findings if f.attribute == "step")
    assert "0 -> 1 -> 2 -> 3" in step.detail
    pending = next(f for f in findings if f.attribute == "pending")
    assert "len 0 -> len 1" in pending.detail  # the list's new elements are not reported one by one


def test_rebound_tensors_are_caught(model):
    attach(model, 1, RebindingTTT)
    findings = unsafe(_check(model, steps=3))
    assert kinds(findings, "transformer.layers.1") == {"fast": {"rebound_tensor"}, "slow": {"rebound_tensor"}}
    assert all("step 1, 2, 3" in f.detail for f in findings)


def test_in_place_update_passes(model):
    attach(model, 0, InPlaceTTT)
    assert unsafe(_check(model, steps=3)) == []


def test_shape_change_is_caught(model):
    attach(model, 0, GrowingTTT)
    findings = unsafe(_check(model, steps=3))
    assert kinds(findings, "transformer.layers.0") == {"history": {"rebound_tensor", "shape_change"}}
    shape = next(f for f in findings if f.kind == "shape_change")
    assert "[0] -> [1] -> [2] -> [3]" in shape.detail


def test_streaming_state_is_searched(model):
    attach(model, 1, StatefulTTT)
    findings = unsafe(_check(model, chunk_size=2, steps=2))
    assert kinds(findings, "transformer.layers.1") == {
        "_streaming_state.count": {"python_value"},
        "_streaming_state.fast": {"rebound_tensor"},
    }


def test_offset_cpu_is_harmless_only_without_weights_per_step(model):
    attribute = "_streaming_state.offset_cpu"
    temporal = model.transformer.layers[0]
    assert harmless_reason(temporal, attribute, "python_value")
    assert harmless_reason(temporal.self_attn, attribute, "python_value")
    # The depformer uses weights_per_step: there offset_cpu picks the weights, so a frozen value would be wrong.
    depformer = model.depformer.layers[0]
    assert depformer.weights_per_step
    assert harmless_reason(depformer, attribute, "python_value") is None
    assert harmless_reason(depformer.self_attn, attribute, "python_value") is None
    # Only the Python value is excused, never a rebinding; other attributes are not excused by name.
    assert harmless_reason(temporal, attribute, "rebound_tensor") is None
    assert harmless_reason(temporal, "_streaming_state.count", "python_value") is None
    assert harmless_reason(model, "_cached_children", "python_value")


def test_steps_past_the_codes_are_checked_too(model):
    """The driver checks its first batch whatever its length: steps past the data still run (clamped reads)."""
    attach(model, 0, PythonSideTTT)
    findings = unsafe(check_graph_safety(model, generate_codes(model, 1, 5), chunk_size=4, steps=3))
    step = next(f for f in findings if f.attribute == "step")
    assert "0 -> 1 -> 2 -> 3" in step.detail
    assert model._streaming_state is None


def test_reference_ttt_layer_is_graph_safe(model):
    ttt = pytest.importorskip("fused_stream.ttt.layer")
    if not hasattr(ttt, "attach_ttt"):
        pytest.skip("fused_stream.ttt.layer has no attach_ttt yet")
    ttt.attach_ttt(model, layers=[0], mini_batch=4, seed=0)
    for chunk in (1, 4):
        findings = _check(model, chunk_size=chunk, steps=5)  # crosses a mini-batch boundary
        assert unsafe(findings) == [], format_findings(findings)
