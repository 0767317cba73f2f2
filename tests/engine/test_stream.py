"""The Stream: a failure while it opens leaves the model exactly as it was, so the out-of-memory retry can work."""

from __future__ import annotations

import pytest
import torch
from moshi.modules.transformer import StreamingMultiheadAttention

from fused_stream.core.runtime import inference_mode
from fused_stream.engine import stream as stream_module
from fused_stream.engine.stream import Stream, ring_caches


def _streaming_modules(model):
    return [name for name, m in model.named_modules() if getattr(m, "_streaming_state", None) is not None]


def _fail_in_enlarge(monkeypatch, error):  # after moshi's streaming() opened: the larger ring caches
    def enlarge(model, context_extra):
        raise error("injected: no memory for the larger ring caches")

    monkeypatch.setattr(stream_module, "enlarge_rings", enlarge)


def _fail_inside_moshi(monkeypatch, error):  # part-way through moshi's own streaming(): its second ring cache
    original, calls = StreamingMultiheadAttention._init_streaming_state, []

    def init(self, batch_size):
        calls.append(1)
        if len(calls) == 2:
            raise error("injected: no memory for a ring cache")
        return original(self, batch_size)

    monkeypatch.setattr(StreamingMultiheadAttention, "_init_streaming_state", init)


@pytest.mark.parametrize("inject", [_fail_in_enlarge, _fail_inside_moshi], ids=["enlarge", "moshi"])
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_a_failure_while_opening_leaves_no_streaming_state(tiny_model, monkeypatch, inject, error):
    inject(monkeypatch, error)
    with inference_mode(tiny_model):
        with pytest.raises(error):
            Stream(tiny_model, 2, 4, 32, "torch")
        assert _streaming_modules(tiny_model) == []  # moshi would otherwise say "already streaming" next time
        monkeypatch.undo()
        stream = Stream(tiny_model, 1, 4, 32, "torch")  # the retry at a smaller batch opens normally
        try:
            assert len(ring_caches(tiny_model)) == len(tiny_model.transformer.layers)
        finally:
            stream.close()
    assert _streaming_modules(tiny_model) == []
