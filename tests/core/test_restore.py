"""`core.restore`: the model handed back bit for bit; moshi's own tensors proven untouched by a whole evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from client_fixtures import attach_client_ttt

from fused_stream import EvalConfig, StreamingEvaluator, evaluate_long_context_loss
from fused_stream.core.restore import ModelChangedError, ModelRestorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_restore_puts_back_values_objects_and_attributes(tiny_model):
    model = copy.deepcopy(tiny_model)
    (ttt,) = attach_client_ttt(model, [0], chunk_size=4, trained=True)
    before, param, buffer = _snapshot(model), ttt.w_down, ttt.w_down_pretrained
    restorer = ModelRestorer(model)
    with torch.no_grad():
        ttt.w_down.add_(1.0)  # written in place
        ttt.w_down_pretrained.mul_(3.0)
    ttt._inference_z_buffer = torch.ones(2, 32)  # a plain attribute filled
    ttt.new_cache = torch.ones(1)  # an attribute added
    ttt.register_buffer("w_down_pretrained", torch.full((32, 32), 9.0))  # a buffer object replaced
    restorer.restore()
    _assert_bitwise(model, before)
    assert ttt.w_down is param and ttt.w_down_pretrained is buffer  # an optimizer's references stay valid
    assert ttt._inference_z_buffer is None and not hasattr(ttt, "new_cache")
    restorer.check_untouched()


def test_a_written_moshi_weight_is_reported_not_handed_back_silently(tiny_model):
    model = copy.deepcopy(tiny_model)
    restorer = ModelRestorer(model)
    assert restorer.host_bytes == 0  # moshi's modules get no copy
    with torch.no_grad():
        model.transformer.layers[0].gating.linear_in.weight.mul_(1.0)
    with pytest.raises(ModelChangedError, match="transformer.layers.0.gating.linear_in.weight"):
        restorer.check_untouched()


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_moshi_writes_no_weight_during_a_whole_evaluation(tiny_model, make_codes, chunk_size):
    """The assumption behind copying nothing of moshi's: after verification, streaming (ring caches enlarged and
    cut, the stacked depformer) and leaving streaming mode, every tensor is bit-identical and no version counter
    moved."""
    model = copy.deepcopy(tiny_model)
    before = _snapshot(model)
    restorer = ModelRestorer(model)
    StreamingEvaluator(model, EvalConfig(chunk_size=chunk_size)).evaluate(make_codes(model, [40, 33], seed=2))
    restorer.check_untouched()
    _assert_bitwise(model, before)


def test_the_drop_in_hands_the_client_layer_back_after_streaming(tiny_model, make_codes):
    """The client's layer writes w_down while streaming and its reset copies the pretrained weight over the trained
    one: after the call (returned or raised), w_down is the trained weight again, bit for bit, its buffer of
    inputs is empty again."""
    model = copy.deepcopy(tiny_model)
    (ttt,) = attach_client_ttt(model, [1], chunk_size=8, trained=True)
    before = _snapshot(model)
    codes = [c[1:9] for c in make_codes(model, [40], seed=3)]
    result = evaluate_long_context_loss(model, codes, verify=False, batch_size=1)
    assert result["librilight_samples"] == 1
    _assert_bitwise(model, before)
    assert ttt._inference_z_buffer is None
