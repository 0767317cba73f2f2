"""`patches.foreign`: which layers are not moshi's, how often they update, and whether chunks are exact for them."""

from __future__ import annotations

import copy

import pytest
import torch
from client_fixtures import ClientTTTGating, attach_client_ttt
from torch import nn

from fused_stream.patches.foreign import chunk_refusal, foreign_layers, foreign_tensors, update_period
from fused_stream.ttt.layer import attach_ttt


def test_a_plain_moshi_model_has_no_foreign_layer(tiny_model):
    assert foreign_layers(tiny_model) == [] and foreign_tensors(tiny_model) == []
    assert chunk_refusal(tiny_model) is None


def test_the_client_layer_is_found_with_its_period_and_refused_in_chunks(tiny_model):
    model = copy.deepcopy(tiny_model)
    attach_client_ttt(model, [1], chunk_size=256)
    layers = foreign_layers(model)
    assert [(layer.name, layer.period, layer.chunk_exact) for layer in layers] == [
        ("transformer.layers.1.gating", 256, False)]
    # its parameter, its buffer, and (once set) its plain tensor attribute; moshi's gating inside is not its own
    kinds = {(kind, name) for _, _, kind, name in foreign_tensors(model)}
    assert kinds == {("parameter", "w_down"), ("buffer", "w_down_pretrained")}
    model.transformer.layers[1].gating._inference_z_buffer = torch.zeros(3, 32)
    assert ("attribute", "_inference_z_buffer") in {(k, n) for _, _, k, n in foreign_tensors(model)}
    reason = chunk_refusal(model)
    assert "transformer.layers.1.gating (ClientTTTGating)" in reason and "chunk_exact = True" in reason


def test_this_packages_ttt_layer_is_known_chunk_exact(tiny_model):
    model = attach_ttt(copy.deepcopy(tiny_model), [0], mini_batch=8, seed=0)
    layers = foreign_layers(model)
    assert [(layer.name, layer.period, layer.chunk_exact, layer.ours) for layer in layers] == [
        ("transformer.layers.0", 8, True, True)]  # its TTTLinear's mini-batch
    assert chunk_refusal(model) is None


def test_a_layer_declaring_chunk_exactness_and_a_stateless_wrapper(tiny_model):
    class Exact(ClientTTTGating):
        chunk_exact = True

    class Passthrough(nn.Module):  # no state of its own: streams like what it wraps
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = copy.deepcopy(tiny_model)
    model.transformer.layers[0].gating = Exact(model.transformer.layers[0].gating, 32, chunk_size=4)
    model.transformer.layers[1].gating = Passthrough(model.transformer.layers[1].gating)
    assert [layer.name for layer in foreign_layers(model)] == ["transformer.layers.0.gating"]
    assert chunk_refusal(model) is None


def test_a_layer_added_inside_a_forked_moshi_package_is_foreign(tiny_model):
    """A fork that puts its TTT layer in the `moshi` package itself (moshi.modules.ttt_module) is still foreign:
    moshi's modules are known by qualified class name, not by package."""
    forked = type("TTTGating", (ClientTTTGating,), {"__module__": "moshi.modules.ttt_module"})
    model = copy.deepcopy(tiny_model)
    model.transformer.layers[0].gating = forked(model.transformer.layers[0].gating, 32, chunk_size=64)
    assert [(layer.name, layer.period) for layer in foreign_layers(model)] == [("transformer.layers.0.gating", 64)]


@pytest.mark.parametrize("attribute,value,expected", [
    ("update_period", 7, 7), ("mini_batch_size", 16, 16), ("chunk_size", 256, 256), ("chunk_size", 0, None),
    ("chunk_size", True, None), ("mini_batch", "16", None),
])
def test_update_period_reads_the_first_positive_int(attribute, value, expected):
    module = nn.Linear(2, 2)
    setattr(module, attribute, value)
    assert update_period(module) == expected
