"""The package's attention step (patches/attention_step.py): streamed losses bit-identical with and without it (moshi's
own forward) (`tiny` and Moshi 7B's structure at tiny dims; frame and chunk mode; B=1 and B=3 ragged; eager and
rehearsed graphs; before and across the ring's wrap), equal to the batch path, moshi's modules restored on close,
and fewer aten ops per step."""

from __future__ import annotations

import functools

import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingMultiheadAttention
from reference_ce import assert_losses_close

from fused_stream.core.config import EvalConfig
from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import load_model
from fused_stream.engine import stream as stream_module
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.patches import attention_step
from fused_stream.patches.patch_probe import PATCHES
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _moshi_7b_structure() -> LMModel:
    """Moshi 7B's configuration with every width shrunk (as bench/test_ops_bench.py), context cut to 16 so the ring
    wraps in a short test; layer counts, dep_q, n_q and delays kept."""
    config = dict(loaders._lm_kwargs) | {
        "dim": 64, "num_heads": 4, "card": 64, "text_card": 96, "context": 16,
        "depformer_dim": 32, "depformer_num_heads": 4, "depformer_dim_feedforward": int(4.125 * 32),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LMModel(**config).to("cpu", torch.float32).eval()


@pytest.fixture(scope="module")
def moshi_7b_structure() -> LMModel:
    return _moshi_7b_structure()


def _patches(shared: bool) -> frozenset[str]:
    return PATCHES if shared else PATCHES - {"attention_step"}


def _evaluate(model, codes, shared: bool, monkeypatch, **config):
    monkeypatch.setattr(stream_module, "Stream", functools.partial(Stream, patches=_patches(shared)))  # RunStreams'
    result = StreamingEvaluator(model, EvalConfig(**config)).evaluate(codes)
    assert result.report["patches"]["attention_step"]["installed"] is shared
    return result


def _assert_identical(a, b) -> None:
    for name in ("losses", "text_losses", "valid", "text_valid"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.nan_to_num(0.0) if x.is_floating_point() else x,
                           y.nan_to_num(0.0) if y.is_floating_point() else y), name


def _check(model, codes, monkeypatch, **config) -> None:
    plain = _evaluate(model, codes, False, monkeypatch, **config)
    shared = _evaluate(model, codes, True, monkeypatch, **config)
    _assert_identical(shared, plain)
    batch = batch_losses(model, codes)
    assert torch.equal(shared.valid, batch.valid) and torch.equal(shared.text_valid, batch.text_valid)
    assert_losses_close(shared.losses, batch.losses, atol=1e-4)
    assert_losses_close(shared.text_losses, batch.text_losses, atol=1e-4)


@pytest.mark.parametrize("graphs", ["off", "rehearse"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("frames", [10, 40], ids=["before-wrap", "across-wrap"])
def test_tiny_is_bit_identical_with_and_without_sharing(tiny_model, frames, chunk, graphs, monkeypatch):
    codes = generate_codes(tiny_model, 1, frames, seed=chunk)
    _check(tiny_model, codes, monkeypatch, chunk_size=chunk, cuda_graphs=graphs, verify_graph=2)
    ragged = generate_codes(tiny_model, 3, [frames, frames - 3, frames // 2], seed=10 + chunk)
    _check(tiny_model, ragged, monkeypatch, chunk_size=chunk, cuda_graphs=graphs, verify_graph=2)


@pytest.mark.parametrize("graphs", ["off", pytest.param("rehearse", marks=pytest.mark.slow)])  # rehearse: 17-38 s
@pytest.mark.parametrize("chunk", [1, 4])
def test_moshi_7b_structure_is_bit_identical_with_and_without_sharing(moshi_7b_structure, chunk, graphs,
                                                                      monkeypatch):
    model = moshi_7b_structure
    codes = generate_codes(model, 1, 24, seed=chunk)  # context 16: across the wrap
    _check(model, codes, monkeypatch, chunk_size=chunk, cuda_graphs=graphs, verify_graph=2)
    ragged = generate_codes(model, 3, [24, 21, 9], seed=20 + chunk)
    _check(model, ragged, monkeypatch, chunk_size=chunk, cuda_graphs=graphs, verify_graph=2)


def test_another_moshi_version_string_still_gets_the_step():
    """Acceptance is by what the step computes (patches/patch_probe.py), not by moshi's version string."""
    import moshi

    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    attentions = [m for m in model.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moshi, "__version__", "0.2.99")
        with inference_mode(model):
            stream = Stream(model, 1, 4, 20, "torch")
            try:
                assert all(isinstance(m.__dict__.get("forward"), attention_step._LayerStep) for m in attentions)
                assert stream.patches["attention_step"]["installed"]
            finally:
                stream.close()


def test_fewer_ops_per_step(moshi_7b_structure, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    model = moshi_7b_structure
    codes = generate_codes(model, 1, 4, seed=0)
    counts = {}
    for shared in (False, True):
        with inference_mode(model):
            stream = Stream(model, 1, 1, 4, "torch", patches=_patches(shared))
            try:
                stream.load(codes, torch.tensor([4]))
                stream.step()
                with Count() as counter:
                    stream.step()
                counts[shared] = counter.n
            finally:
                stream.close()
    assert counts[True] <= counts[False] - 31 * 40  # ~49 ops saved per follower layer (31 of 32)


def test_a_follower_that_runs_before_its_leader_is_refused(tiny_model):
    """A temporal attention called before the leader in a step would read the previous step's RoPE angles, ring
    indices and mask (same shapes, so the shape key alone cannot tell): refused by name."""
    codes = generate_codes(tiny_model, 1, 8, seed=12)
    with inference_mode(tiny_model):
        stream = Stream(tiny_model, 1, 1, 8, "torch")
        try:
            stream.load(codes, torch.tensor([8]))
            stream.step()  # the leader and its follower, in order: fine
            follower = stream.attention.modules[1]
            x = torch.zeros(1, 1, follower.embed_dim)
            with pytest.raises(RuntimeError, match="layer 1 ran before its leader"):
                follower(x, x, x)
        finally:
            stream.close()
