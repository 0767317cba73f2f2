"""`inference_mode`: eval mode in, the caller's mode back out (even on error), no autograd, no inductor on CPU."""

from __future__ import annotations

import pytest
import torch
from moshi.utils import compile as moshi_compile

from fused_stream.core.runtime import inference_mode


def test_inside_eval_no_grad_no_compile_then_restored(tiny_model):
    tiny_model.train()
    try:
        with inference_mode(tiny_model):
            assert not tiny_model.training
            assert not torch.is_grad_enabled()
            assert moshi_compile._compile_disabled  # moshi's torch_compile_lazy helpers run eagerly on CPU
        assert tiny_model.training and torch.is_grad_enabled() and not moshi_compile._compile_disabled
    finally:
        tiny_model.eval()


def test_mode_restored_when_the_body_raises(tiny_model):
    tiny_model.train()
    try:
        with pytest.raises(RuntimeError, match="boom"), inference_mode(tiny_model):
            raise RuntimeError("boom")
        assert tiny_model.training
    finally:
        tiny_model.eval()
    with inference_mode(tiny_model):
        pass
    assert not tiny_model.training  # an eval-mode model stays in eval mode


def test_each_module_gets_its_own_mode_back(tiny_model):
    from fused_stream.core.runtime import inference_mode

    tiny_model.train()
    tiny_model.depformer.eval()  # e.g. a frozen part kept in eval mode inside a training model
    try:
        with inference_mode(tiny_model):
            assert not any(m.training for m in tiny_model.modules())
        assert tiny_model.training and tiny_model.transformer.training
        assert not any(m.training for m in tiny_model.depformer.modules())
    finally:
        tiny_model.eval()
