"""Per-instance acceptance of the patches of moshi's code (patches/patch_probe.py): with moshi unchanged every patch is
installed and its probe runs once per geometry; with a simulated moshi change (another attention output, another ring
read order, from the start or only past the ring's wrap) the probe refuses exactly the patches that no longer
reproduce moshi, the report names them and why, and the run still equals the (changed) moshi's batch path."""

from __future__ import annotations

import pytest
import torch
from moshi.modules.transformer import KVCacheResult, RingKVCache, StreamingMultiheadAttention
from reference_ce import assert_losses_close

from fused_stream.core.config import EvalConfig
from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.patches import patch_probe
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = {"ring_cut", "attention_step", "stacked_depformer"}


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    patch_probe.clear_verdicts()
    yield
    patch_probe.clear_verdicts()


def test_unmodified_moshi_accepts_every_patch_and_probes_once(tiny_model):
    with inference_mode(tiny_model):
        first = Stream(tiny_model, 2, 4, 20, "torch")
        first.close()
        again = Stream(tiny_model, 3, 4, 12, "torch")  # another batch shape, same geometry: the cached verdicts
        again.close()
    assert set(first.patches) == ALL
    for name in ALL:
        assert first.patches[name]["installed"] and first.patches[name]["reason"] is None, name
        assert first.patches[name]["probe_seconds"] > 0 and not first.patches[name]["cached"], name
        assert again.patches[name] == {"installed": True, "reason": None, "probe_seconds": 0.0, "cached": True}


def test_a_patch_turned_off_by_the_caller_is_reported_so(tiny_model):
    attentions = [m for m in tiny_model.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    with inference_mode(tiny_model):
        stream = Stream(tiny_model, 1, 1, 8, "torch", patches=frozenset({"ring_cut"}))
        try:
            assert not any("forward" in m.__dict__ for m in attentions)  # moshi's forward runs
            assert all("_complete_kv" in m.__dict__ for m in attentions)  # the ring cut is in
        finally:
            stream.close()
    assert stream.patches["ring_cut"]["installed"]
    for name in ("attention_step", "stacked_depformer"):
        assert not stream.patches[name]["installed"] and "turned off" in stream.patches[name]["reason"]


# ----------------------------------------------------------------------------------------- simulated moshi changes


def _scaled_attention(monkeypatch) -> None:
    """A moshi whose attention output is 1/64 larger: still self-consistent (its batch path changes alike)."""
    original = StreamingMultiheadAttention.forward

    def forward(self, query, key, value):
        return original(self, query, key, value) * (1 + 1 / 64)

    monkeypatch.setattr(StreamingMultiheadAttention, "forward", forward)


def _reversed_ring(monkeypatch, after_wrap: bool) -> None:
    """A moshi whose ring hands its slots to the attention in reverse order (keys, values and their positions alike:
    the same keys attend, summed in another order), from the first step or only once the ring has wrapped."""
    original = RingKVCache.complete

    def complete(self, k, v, exec_mask):
        keys, values, positions = original(self, k, v, exec_mask)
        if after_wrap and bool((self.end_offset <= self.capacity).all()):  # a host read: eager test runs only
            return KVCacheResult(keys, values, positions)
        return KVCacheResult(keys.flip(2), values.flip(2), positions.flip(1))

    monkeypatch.setattr(RingKVCache, "complete", complete)


CHANGES = {
    "attention-output-scaled": (_scaled_attention, {"attention_step", "stacked_depformer"}),
    "ring-reversed": (lambda mp: _reversed_ring(mp, after_wrap=False), {"ring_cut", "attention_step"}),
    "ring-reversed-after-wrap": (lambda mp: _reversed_ring(mp, after_wrap=True), {"attention_step"}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_moshi_gets_only_the_patches_that_still_reproduce_it(tiny_model, change, monkeypatch):
    simulate, refused = CHANGES[change]
    simulate(monkeypatch)
    codes = generate_codes(tiny_model, 2, [40, 29], seed=3)  # the stream's ring (context 16 + 3) wraps twice
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, cuda_graphs="off")).evaluate(codes)
    patches = result.report["patches"]
    assert {name for name, verdict in patches.items() if not verdict["installed"]} == refused
    for name in refused:
        assert "differ by up to" in patches[name]["reason"], (name, patches[name]["reason"])
        assert patches[name]["probe_seconds"] > 0
    batch = batch_losses(tiny_model, codes)  # the changed moshi's own batch path
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses, atol=1e-4)
    assert_losses_close(result.text_losses, batch.text_losses, atol=1e-4)


def test_the_probe_passes_the_wrap_of_a_one_frame_ring(tiny_model, monkeypatch):
    """At chunk 1 too: the after-wrap change is caught though the stream's own chunk is 4 (probed at 1 and at 4)."""
    _reversed_ring(monkeypatch, after_wrap=True)
    calls = []
    probe = patch_probe._probe_attention

    def counted(like, chunk, patch, cut=False):
        calls.append((chunk, patch))
        return probe(like, chunk, patch, cut)

    monkeypatch.setattr(patch_probe, "_probe_attention", counted)
    with inference_mode(tiny_model):
        stream = Stream(tiny_model, 1, 1, 8, "torch")
        stream.close()
    assert calls == [(1, "ring_cut"), (1, "attention_step")]
    assert stream.patches["ring_cut"]["installed"] and not stream.patches["attention_step"]["installed"]
    assert "chunk 1" in stream.patches["attention_step"]["reason"]
