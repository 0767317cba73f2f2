"""The graph runner: mode resolution, eager fallback, replay verification (CPU), and graph == eager (GPU)."""

from __future__ import annotations

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses

from fused_stream.core.alignment import valid_masks
from fused_stream.core.config import EvalConfig, make_plan
from fused_stream.core.driver import StreamingEvaluator
from fused_stream.core.graphs import (
    DISABLE_ENV,
    CUDAGraphed,
    GraphCaptureError,
    GraphMismatchError,
    first_difference,
    graphs_wanted,
    verify_replay,
)
from fused_stream.core.inputs import pad_batch
from fused_stream.core.runtime import inference_mode
from fused_stream.core.stream import Stream

NAMES = ["text"] + [f"audio codebook {k}" for k in range(8)]


def test_graph_mode_resolution(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graphs_wanted("auto", cpu) == (False, "device is cpu")
    assert graphs_wanted("off", cuda) == (False, "cuda_graphs='off'")
    assert graphs_wanted("auto", cuda) == (True, "captured")
    assert graphs_wanted("on", cuda) == (True, "captured")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        graphs_wanted("on", cpu)
    with pytest.raises(ValueError, match="cuda_graphs"):
        graphs_wanted("sometimes", cpu)
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert graphs_wanted("on", cuda) == (False, f"{DISABLE_ENV}=1")


def _loaded_stream(model, sequences, chunk=1, unroll=1, capacity=None):
    batch, lengths = pad_batch(model, sequences)
    stream = Stream(model, batch.shape[0], chunk, capacity or batch.shape[-1], "torch", unroll=unroll)
    stream.load(batch, lengths)
    return stream, batch, lengths


def _eager(stream):
    return CUDAGraphed(stream.step, stream.reset, None)


def _run(graphed, stream, T):
    for _ in range(stream.n_calls):
        graphed()
    return stream.host_losses(T)


def test_cpu_falls_back_to_eager_and_stays_exact(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [37, 22], seed=1)
    with inference_mode(tiny_model):
        stream, batch, lengths = _loaded_stream(tiny_model, sequences, chunk=4)
        try:
            plan = make_plan(EvalConfig(cuda_graphs="auto"), torch.device("cpu"))
            assert not plan.graphs and plan.graph_reason == "device is cpu"
            graphed = _eager(stream)
            graphed.capture()  # no pool: nothing to capture
            assert not graphed.graphed
            audio, text, _ = _run(graphed, stream, batch.shape[-1])
        finally:
            stream.close()
    valid, text_valid = valid_masks(tiny_model, batch, lengths)
    for b, seq in enumerate(sequences):
        ref_audio, ref_text, _, _ = forward_losses(tiny_model, seq[None])
        T = seq.shape[1]
        assert_losses_close(torch.where(valid[b, :, :T], audio[b, :, :T], torch.nan)[None], ref_audio)
        assert_losses_close(torch.where(text_valid[b, :, :T], text[b, :, :T], torch.nan)[None], ref_text)


def test_a_reset_stream_is_bit_identical_to_a_fresh_one(tiny_model, make_codes):
    """One Stream serves every batch of its shape: load() after another batch must not leak any state."""
    first, second = make_codes(tiny_model, [60, 60], seed=2), make_codes(tiny_model, [45, 60], seed=3)
    with inference_mode(tiny_model):
        fresh, batch, _ = _loaded_stream(tiny_model, second, chunk=8, capacity=64)
        try:
            graphed = _eager(fresh)
            expected = _run(graphed, fresh, batch.shape[-1])
        finally:
            fresh.close()
        reused, other, other_lengths = _loaded_stream(tiny_model, first, chunk=8, capacity=64)
        try:
            graphed = _eager(reused)
            _run(graphed, reused, other.shape[-1])
            reused.load(*pad_batch(tiny_model, second))
            got = _run(graphed, reused, batch.shape[-1])
        finally:
            reused.close()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b)


def test_verify_replay_passes_for_two_eager_runs(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [30, 30], seed=4)
    with inference_mode(tiny_model):
        stream, _, _ = _loaded_stream(tiny_model, sequences, chunk=2)
        try:
            graphed = _eager(stream)
            assert verify_replay(graphed, stream, 10, NAMES) == 10
            assert verify_replay(graphed, stream, 1000, NAMES) == stream.n_calls  # capped at the batch
        finally:
            stream.close()


def test_verify_replay_names_the_first_difference(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [30, 30], seed=5)
    with inference_mode(tiny_model):
        stream, _, _ = _loaded_stream(tiny_model, sequences, chunk=1)
        try:
            calls = {"n": 0}

            def replay_with_a_flipped_bit():  # stands in for a replay that went wrong at one position
                stream.step()
                calls["n"] += 1
                if calls["n"] == 10:
                    cell = stream.losses[1, 3, stream.lead + 7]
                    cell.copy_((cell.view(torch.int32) ^ 1).view(torch.float32))

            with pytest.raises(GraphMismatchError, match=r"batch 1, audio codebook 2, position 7"):
                verify_replay(replay_with_a_flipped_bit, stream, 20, NAMES)
        finally:
            stream.close()


def test_first_difference_compares_bits():
    a = torch.tensor([[[float("nan"), 1.0, 0.0]]])
    first_difference(a, a.clone(), ["text"], lead=0)  # NaN equals NaN bit for bit
    b = a.clone()
    b[0, 0, 2] = -0.0  # equal as floats, different bits
    with pytest.raises(GraphMismatchError, match="position 2"):
        first_difference(a, b, ["text"], lead=0)
    c = a.clone()
    c[0, 0, 1] = 2.0
    c[0, 0, 2] = 5.0
    with pytest.raises(GraphMismatchError, match="position 0"):
        first_difference(a, c, ["text"], lead=1)  # the earliest column (1), minus lead


@pytest.mark.parametrize("chunk,unroll", [(1, 3), (4, 5)])
def test_unrolled_steps_pad_and_mask(tiny_model, make_codes, chunk, unroll):
    """graph_unroll=U pads each batch to a multiple of C*U frames; the padded steps score nothing."""
    sequences = make_codes(tiny_model, [41, 23, 17], seed=6)
    base = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=chunk, batch_size=2)).evaluate(sequences)
    unrolled = StreamingEvaluator(
        tiny_model, EvalConfig(chunk_size=chunk, batch_size=2, graph_unroll=unroll, verify_graph=4)
    ).evaluate(sequences)
    assert torch.equal(unrolled.valid, base.valid)
    assert torch.equal(unrolled.losses.view(torch.int32), base.losses.view(torch.int32))
    assert torch.equal(unrolled.text_losses.view(torch.int32), base.text_losses.view(torch.int32))
    assert unrolled.report["scored_positions"] == base.report["scored_positions"]
    assert unrolled.report["steps"] % unroll == 0
    assert unrolled.report["cuda_graphs"]["verified_calls"] > 0


def test_a_stream_is_opened_once_per_shape(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [50, 48, 40, 39, 12], seed=7)  # B = 2: shapes (2, 50), (2, 40), (1, 12)
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, batch_size=2)).evaluate(sequences)
    assert result.report["cuda_graphs"]["streams_opened"] == 2  # the (2, 40) batch reuses the (2, 50) stream


def test_graphs_on_without_cuda_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StreamingEvaluator(tiny_model, EvalConfig(cuda_graphs="on"))


# --------------------------------------------------------------------------------------------------------------
# GPU: graph == eager bit for bit, and the capture fallback
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1, 8])
def test_graph_equals_eager_bitwise_over_200_steps(make_codes, chunk):
    from fused_stream.data.models import load_model

    model = load_model("small", device="cuda")  # bf16
    codes = make_codes(model, [200 * chunk, 200 * chunk - 5], seed=9)
    eager = StreamingEvaluator(model, EvalConfig(chunk_size=chunk, cuda_graphs="off")).evaluate(codes)
    graphed = StreamingEvaluator(model, EvalConfig(chunk_size=chunk, cuda_graphs="on", verify_graph=200))
    result = graphed.evaluate(codes)
    assert result.report["cuda_graphs"]["graphed"] and result.report["cuda_graphs"]["verified_calls"] == 200
    assert torch.equal(result.losses.view(torch.int32), eager.losses.view(torch.int32))
    assert torch.equal(result.text_losses.view(torch.int32), eager.text_losses.view(torch.int32))


@pytest.mark.gpu
def test_capture_falls_back_when_the_model_syncs(make_codes, monkeypatch, caplog):
    from fused_stream.core.reference import batch_losses
    from fused_stream.data.models import load_model

    model = load_model("tiny", device="cuda", dtype=torch.float32)
    codes = make_codes(model, [40, 33], seed=10)
    original = model.forward_text

    def forward_text_that_syncs(sequence, *args, **kwargs):
        out = original(sequence, *args, **kwargs)
        out[0].sum().item()  # a host read: legal eagerly, fatal to capture
        return out

    monkeypatch.setattr(model, "forward_text", forward_text_that_syncs)
    with caplog.at_level("WARNING", logger="fused_stream.core.graphs"):
        result = StreamingEvaluator(model, EvalConfig(cuda_graphs="auto")).evaluate(codes)
    assert not result.report["cuda_graphs"]["graphed"]
    assert "capture failed" in result.report["cuda_graphs"]["reason"]
    assert any("capture failed" in r.getMessage() for r in caplog.records)
    reference = batch_losses(model, codes)
    assert_losses_close(result.losses, reference.losses)
    with pytest.raises(GraphCaptureError):
        StreamingEvaluator(model, EvalConfig(cuda_graphs="on")).evaluate(codes)


@pytest.mark.gpu
def test_a_second_shape_is_captured_in_the_same_run(make_codes):
    """B=2 then B=1: two captures into the run's one pool, both replayed, results equal to eager."""
    from fused_stream.data.models import load_model

    model = load_model("tiny", device="cuda", dtype=torch.float32)
    codes = make_codes(model, [48, 40, 33], seed=11)
    eager = StreamingEvaluator(model, EvalConfig(chunk_size=4, batch_size=2, cuda_graphs="off")).evaluate(codes)
    result = StreamingEvaluator(
        model, EvalConfig(chunk_size=4, batch_size=2, cuda_graphs="on", verify_graph=5)
    ).evaluate(codes)
    graphs = result.report["cuda_graphs"]
    assert graphs["streams_opened"] == graphs["captures"] == 2 and graphs["graphed"]
    assert torch.equal(result.losses.view(torch.int32), eager.losses.view(torch.int32))


def test_calls_past_the_loaded_batch_stay_inside_the_buffer(tiny_model, make_codes):
    """The warm-up before a capture runs WARMUP_CALLS steps whatever the batch's length; a short batch (T=8, C=4:
    two calls) must not gather past the delayed buffer (on CUDA a device-side assert), and a reset afterwards
    must give the batch's exact losses."""
    from fused_stream.core.graphs import WARMUP_CALLS

    sequences = make_codes(tiny_model, [8], seed=61)
    with inference_mode(tiny_model):
        stream, batch, _ = _loaded_stream(tiny_model, sequences, chunk=4)
        try:
            assert stream.n_calls < WARMUP_CALLS
            for _ in range(WARMUP_CALLS + 2):
                stream.step()
            stream.reset()
            audio, text, _ = _run(_eager(stream), stream, batch.shape[-1])
        finally:
            stream.close()
    ref_audio, ref_text, _, _ = forward_losses(tiny_model, sequences[0][None])
    assert_losses_close(audio[:1], ref_audio)
    assert_losses_close(text[:1], ref_text)
