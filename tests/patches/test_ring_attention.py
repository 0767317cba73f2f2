"""Attention over the ring slots that hold keys (patches/ring_attention.py): exact against the batch path before and
across the ring's wrap, frame and chunk mode, ragged batches, eager and rehearsed per-bucket graphs; fewer keys
really attended; moshi's modules restored on close; TTT layers still exact."""

from __future__ import annotations

import pytest
import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingMultiheadAttention
from reference_ce import assert_losses_close

from fused_stream.core.config import EvalConfig
from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import load_model, preset_config
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.patches import attention_step
from fused_stream.patches.ring_attention import MAX_BUCKETS, RingAttention, fill_buckets
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _evaluate(model, codes, **config):
    return StreamingEvaluator(model, EvalConfig(**config)).evaluate(codes)


def _assert_equals_batch_path(model, codes, result):
    batch = batch_losses(model, codes)
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses, atol=1e-4)
    assert_losses_close(result.text_losses, batch.text_losses, atol=1e-4)


def _small_structured(context: int = 200) -> LMModel:
    """`small`'s structure (rope, SiLU gating, RMS norms, multi-linear depformer) at test size, context 200."""
    cfg = preset_config("small") | {"dim": 64, "num_heads": 4, "num_layers": 2, "hidden_scale": 2, "context": context,
                                    "card": 128, "text_card": 256, "depformer_dim": 32, "depformer_num_heads": 2,
                                    "depformer_num_layers": 1, "depformer_dim_feedforward": 64}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LMModel(**cfg, device="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def small_model():
    return _small_structured()


@pytest.fixture
def transformer_keys(monkeypatch):
    """watch(model) -> the list of key lengths of every SDPA call inside `model.transformer` (not the depformer)."""
    lengths: list[int] = []
    inside = {"on": False}
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if inside["on"]:
            lengths.append(k.shape[-2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)  # moshi calls F.scaled_...
    hooks = []

    def watch(model):
        hooks.append(model.transformer.register_forward_pre_hook(lambda *_: inside.update(on=True)))
        hooks.append(model.transformer.register_forward_hook(lambda *_: inside.update(on=False)))
        return lengths

    yield watch
    for hook in hooks:
        hook.remove()


# ------------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("graphs", ["off", "rehearse"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("frames", [10, 60], ids=["before-wrap", "across-wrap"])
def test_tiny_equals_the_batch_path_before_and_across_the_wrap(tiny_model, frames, chunk, graphs):
    assert frames < tiny_model.context or frames > 3 * tiny_model.context
    codes = generate_codes(tiny_model, 1, frames, seed=chunk)  # B = 1
    result = _evaluate(tiny_model, codes, chunk_size=chunk, cuda_graphs=graphs, verify_graph=2)
    _assert_equals_batch_path(tiny_model, codes, result)
    assert result.report["cuda_graphs"]["rehearsed"] is (graphs == "rehearse")
    ragged = generate_codes(tiny_model, 3, [frames, frames - 3, frames // 2], seed=10 + chunk)  # B = 3, padded
    result = _evaluate(tiny_model, ragged, chunk_size=chunk, cuda_graphs=graphs, verify_graph=3)
    _assert_equals_batch_path(tiny_model, ragged, result)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_a_small_structured_model_with_a_long_context_equals_the_batch_path(small_model, chunk):
    """Context 200, T = 300: most calls run before the wrap (the case the filled prefix speeds up), then across it."""
    codes = generate_codes(small_model, 3, [300, 271, 150], seed=chunk)
    result = _evaluate(small_model, codes, chunk_size=chunk, cuda_graphs="rehearse", verify_graph=2)
    _assert_equals_batch_path(small_model, codes, result)
    single = generate_codes(small_model, 1, 300, seed=20 + chunk)
    _assert_equals_batch_path(small_model, single, _evaluate(small_model, single, chunk_size=chunk))


def test_a_ttt_layer_still_streams_exactly(make_codes):
    from fused_stream.ttt.layer import attach_ttt

    model = attach_ttt(load_model("tiny", device="cpu", dtype=torch.float32, seed=0), [0, 1], mini_batch=4,
                       alpha=0.5, seed=1)
    codes = make_codes(model, [42, 29], seed=3)  # past the context of 16: across the wrap
    for chunk, graphs in [(1, "off"), (4, "rehearse"), (6, "off")]:
        _assert_equals_batch_path(model, codes, _evaluate(model, codes, chunk_size=chunk, cuda_graphs=graphs))


# ------------------------------------------------------------------------------------------------ keys attended


def test_only_the_filled_slots_are_attended_before_the_wrap(small_model, transformer_keys):
    """Eager and rehearsed runs alike attend over the fill bucket of each call (rounded up, never less): the same
    slot count, so that a graphed run equals an eager one bit for bit (an exact count would differ in the last bit)."""
    layers = len(small_model.transformer.layers)
    codes = generate_codes(small_model, 2, 300, seed=5)
    ring = small_model.context + 4 - 1
    fills = [min(ring, 4 * (call + 1)) for call in range(300 // 4)]
    buckets = fill_buckets(ring, 300, 4)
    assert len(buckets) <= MAX_BUCKETS + 1 and buckets[-1] is None  # 300 frames reach past the ring: the full ring
    expected = [min(ring, next(b or ring for b in buckets if b is None or b >= fill)) for fill in fills]
    keys = transformer_keys(small_model)
    _evaluate(small_model, codes, chunk_size=4, verify=False)  # eager
    assert keys == [n for n in expected for _ in range(layers)]
    keys.clear()
    _evaluate(small_model, codes, chunk_size=4, verify=False, cuda_graphs="rehearse")
    # Warm-ups and captures first, then one call per 4 frames: each the bucket of its fill.
    replayed = keys[-layers * len(fills):]
    assert replayed == [n for n in expected for _ in range(layers)]
    assert sum(replayed) < 0.8 * ring * len(replayed)  # what moshi's full-ring path would attend


def test_a_direct_stream_step_keeps_moshis_full_ring(tiny_model, transformer_keys):
    """Outside the driver's RingSteps (tests, the graph-safety check, eager verification) nothing is cut."""
    codes = generate_codes(tiny_model, 1, 8, seed=6)
    keys = transformer_keys(tiny_model)
    with inference_mode(tiny_model):
        stream = Stream(tiny_model, 1, 2, 8, "torch")
        try:
            stream.load(codes, torch.tensor([8]))
            for _ in range(stream.n_calls):
                stream.step()
        finally:
            stream.close()
    assert set(keys) == {tiny_model.context + 1}


def test_fill_buckets():
    assert fill_buckets(3063, 640, 64) == [192, 384, 576, 768]  # `small`, C = 64, T = 600: four captures
    # 3072 wraps the ring in one step of 64: its step attends the whole ring, so it is the None bucket, once
    assert fill_buckets(3063, 3200, 64) == [192 * k for k in range(1, 16)] + [None]
    assert fill_buckets(3063, 3072, 64) == [192 * k for k in range(1, 16)] + [None]
    assert fill_buckets(3000, 3200, 1) == [188 * k for k in range(1, 16)] + [None]  # `small`, frame mode
    assert fill_buckets(16, 60, 1) == list(range(1, 16)) + [None]
    assert fill_buckets(19, 12, 4) == [4, 8, 12]
    # C = 4, U = 5: the first call's steps attend 4, 8, 12, 16, all (19 slots); then the whole ring
    assert fill_buckets(19, 60, 20, chunk=4) == [20, None]
    # C = 4, U = 2 past a ring of 19: the call of edge 24 attends 20 (whole) then 24 (whole): one None bucket
    assert fill_buckets(19, 60, 8, chunk=4) == [8, 16, None]
    assert fill_buckets(0, 100, 4) == [None]  # no ring attention: one full-ring step


@pytest.mark.parametrize("chunk,unroll", [(1, 1), (4, 1), (3, 2)])
def test_graphed_and_eager_runs_are_bit_identical_across_the_wrap(small_model, chunk, unroll):
    """Rehearsed graphs (every bucket's step replayed, verified call by call against eager calls over the whole
    batch) and a plain eager run give the same bits, before and across the ring's wrap, ragged batches included.
    Context 200: buckets are wider than a call (13 to 18 frames), so an exact-count eager run would differ."""
    codes = generate_codes(small_model, 2, [230, 211], seed=30 + chunk)  # past the ring of 200 + C - 1
    common = {"chunk_size": chunk, "graph_unroll": unroll, "batch_size": 2, "verify": False}
    eager = _evaluate(small_model, codes, cuda_graphs="off", **common)
    rehearsed = _evaluate(small_model, codes, cuda_graphs="rehearse", verify_graph=10_000, **common)
    calls = -(-230 // (chunk * unroll))
    assert rehearsed.report["cuda_graphs"]["rehearsed"] and rehearsed.report["cuda_graphs"]["verified_calls"] == calls
    for name in ("losses", "text_losses"):
        assert torch.equal(getattr(eager, name).view(torch.int32), getattr(rehearsed, name).view(torch.int32)), name
    _assert_equals_batch_path(small_model, codes, eager)


def test_every_bucket_is_exercised_by_a_batch_that_wraps(tiny_model):
    from fused_stream.engine.steps import RingSteps

    codes = generate_codes(tiny_model, 1, 40, seed=40)
    with inference_mode(tiny_model):
        stream = Stream(tiny_model, 1, 4, 40, "torch")
        try:
            stream.load(codes, torch.tensor([40]))
            steps = RingSteps(stream, None)
            for _ in range(stream.n_calls):
                steps()
        finally:
            stream.close()
    assert steps.buckets == [4, 8, 12, 16, None] and steps.bucket_calls == [1, 1, 1, 1, 6]



# ------------------------------------------------------------------------------------------------ install, restore


def test_closing_the_stream_restores_moshis_modules(make_codes):
    """Both shadows (the ring cut and the per-step sharing) are removed: moshi's forward is bit-identical after."""
    model, fresh = (load_model("tiny", device="cpu", dtype=torch.float32, seed=0) for _ in range(2))
    attentions = [m for m in model.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    codes = torch.stack(make_codes(model, [20, 20], seed=7))
    with inference_mode(model):
        stream = Stream(model, 2, 4, 20, "torch")
        assert len(stream.attention.modules) == len(attentions)  # every temporal attention, no depformer one
        assert all("_complete_kv" in m.__dict__ for m in attentions)
        # patches/attention_step.py's step shadows the same instances' forward, and only theirs
        assert all(isinstance(m.__dict__.get("forward"), attention_step._LayerStep) for m in attentions)
        assert not any("_complete_kv" in m.__dict__ or "forward" in m.__dict__ for m in model.depformer.modules())
        stream.close()
    assert not any("_complete_kv" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        after, expected = model(codes), fresh(codes)
    assert torch.equal(after.logits.nan_to_num(0.0), expected.logits.nan_to_num(0.0))
    assert torch.equal(after.text_logits, expected.text_logits)


def test_uninstall_restores_a_previous_instance_attribute(tiny_model):
    with inference_mode(tiny_model), tiny_model.streaming(1):
        module = next(m for m in tiny_model.transformer.modules() if isinstance(m, StreamingMultiheadAttention))
        marker = module._complete_kv
        module.__dict__["_complete_kv"] = marker
        with RingAttention(tiny_model) as ring:
            assert module._complete_kv is not marker
            with pytest.raises(RuntimeError, match="already installed"):
                ring.install()
        assert module.__dict__.pop("_complete_kv") is marker
