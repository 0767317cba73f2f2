"""The reference TTT-Linear layer: streaming (frame and chunk) == LMModel.forward, fast weights, resets, report."""

from __future__ import annotations

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses

from fused_stream.core.config import EvalConfig
from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import load_model
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.ttt.layer import TTTLinear, attach_ttt
from fused_stream.ttt.tracker import TTTTracker, ttt_modules, ttt_report

MB = 4
# Large enough that the layer visibly changes the losses: with alpha ~ 0 every equivalence would hold trivially.
ALPHA = 0.5
T = 42  # > 10 mini-batches, > the tiny context of 16, and not a multiple of MB (a partial last mini-batch)


def _ttt_model(layers: tuple[int, ...] = (0, 1), mini_batch: int = MB) -> torch.nn.Module:
    """A fresh tiny model with TTT (never the session fixture: attach_ttt mutates the model)."""
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    return attach_ttt(model, list(layers), mini_batch=mini_batch, alpha=ALPHA, seed=1)


def _evaluate(model, codes, chunk: int = 1):
    return StreamingEvaluator(model, EvalConfig(chunk_size=chunk)).evaluate(codes)


@pytest.fixture(scope="module")
def ttt_model():
    return _ttt_model()


@pytest.fixture(scope="module")
def codes(ttt_model):
    return generate_codes(ttt_model, 2, T, seed=3)


@pytest.fixture(scope="module")
def frame_result(ttt_model, codes):
    """Frame mode once per module: the chunk tests compare against it (CPU time is shared in CI)."""
    return _evaluate(ttt_model, codes, chunk=1)


def test_attach_inserts_streaming_modules(ttt_model):
    names = [name for name, _ in ttt_modules(ttt_model)]
    assert names == ["transformer.layers.0.ttt", "transformer.layers.1.ttt"]
    assert all(isinstance(module, TTTLinear) for _, module in ttt_modules(ttt_model))
    with pytest.raises(ValueError, match="already"):
        attach_ttt(ttt_model, [0])


def test_ttt_changes_the_losses(ttt_model, codes):
    plain = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    audio_plain, text_plain, _, _ = forward_losses(plain, codes)
    audio, text, _, _ = forward_losses(ttt_model, codes)
    assert (audio - audio_plain).abs().nan_to_num(0.0).max() > 1e-2
    assert (text - text_plain).abs().nan_to_num(0.0).max() > 1e-2


def test_frame_mode_equals_forward(ttt_model, codes, frame_result):
    audio, text, _, _ = forward_losses(ttt_model, codes)
    result = frame_result
    assert_losses_close(result.losses, audio, atol=1e-4)
    assert_losses_close(result.text_losses, text, atol=1e-4)


@pytest.mark.parametrize("chunk", [MB, 2 * MB, 3, 6])
def test_chunk_mode_equals_frame_mode(ttt_model, codes, frame_result, chunk):
    """C a multiple of mb, and C that puts mini-batch boundaries inside chunks (and pads the tail)."""
    frame = frame_result
    chunked = _evaluate(ttt_model, codes, chunk=chunk)
    assert_losses_close(chunked.losses, frame.losses, atol=1e-4)
    assert_losses_close(chunked.text_losses, frame.text_losses, atol=1e-4)


def test_variable_lengths_equal_forward_each(ttt_model):
    """A padded batch of unequal lengths: each row equals its own LMModel.forward (state is per row)."""
    seqs = generate_codes(ttt_model, 2, [T, 23], seed=5)
    result = _evaluate(ttt_model, seqs, chunk=MB)
    for i, seq in enumerate(seqs):
        audio, text, _, _ = forward_losses(ttt_model, seq[None])
        row = result.row(i)
        assert_losses_close(row.losses, audio, atol=1e-4)
        assert_losses_close(row.text_losses, text, atol=1e-4)


def _stream_through(model, codes, chunk):
    """Run a Stream over codes by hand; returns (stream, tracker) still open (caller closes)."""
    B, _, frames = codes.shape
    stream = Stream(model, B, chunk, frames, backend="torch")
    tracker = TTTTracker(model)
    stream.load(codes, torch.full((B,), frames, dtype=torch.long))
    tracker.begin_batch()
    for _ in range(stream.n_calls):
        stream.step()
    tracker.end_batch()
    return stream, tracker


@pytest.mark.parametrize("chunk", [1, 8])
def test_fast_weights_after_sequence_equal_batch_scan(chunk):
    model = _ttt_model(layers=(1,))
    frames = 10 * MB  # a multiple of MB and of the chunk: both paths see exactly `frames` positions
    codes = generate_codes(model, 2, frames, seed=7)
    ttt = model.transformer.layers[1].ttt
    seen: list[torch.Tensor] = []
    handle = ttt.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with inference_mode(model):
        forward_losses(model, codes)
        handle.remove()
        (x,) = seen
        assert x.shape[1] == frames
        _, w_ref, b_ref = ttt.scan(*ttt._project(x))
        stream, _ = _stream_through(model, codes, chunk)
        try:
            state = ttt._streaming_state
            assert torch.equal(state.updates, torch.full((2,), frames // MB))
            assert torch.equal(state.pos, torch.zeros(2, dtype=torch.long))
            assert torch.allclose(state.w0, w_ref, atol=1e-5, rtol=1e-4)
            assert torch.allclose(state.b0, b_ref, atol=1e-5, rtol=1e-4)
            assert (state.w0 - ttt.w_init).abs().max() > 1e-3  # it did learn something
        finally:
            stream.close()


def test_new_evaluate_starts_from_initial_fast_weights(ttt_model):
    a = generate_codes(ttt_model, 1, T, seed=11)
    b = generate_codes(ttt_model, 1, T, seed=12)
    evaluator = StreamingEvaluator(ttt_model, EvalConfig(chunk_size=MB))
    first, _, again = evaluator.evaluate(a), evaluator.evaluate(b), evaluator.evaluate(a)
    assert torch.equal(first.losses.nan_to_num(-1.0), again.losses.nan_to_num(-1.0))
    # And across batches of one run (a Stream reused, reset in place between them): same as alone.
    both = StreamingEvaluator(ttt_model, EvalConfig(chunk_size=MB, batch_size=1)).evaluate([b[0], a[0]])
    assert torch.equal(both.row(1).losses.nan_to_num(-1.0), first.losses.nan_to_num(-1.0))


def test_state_is_updated_in_place_and_reset_per_row():
    model = _ttt_model(layers=(0,))
    codes = generate_codes(model, 2, 2 * MB, seed=2)
    ttt = model.transformer.layers[0].ttt
    with inference_mode(model):
        stream = Stream(model, 2, 1, codes.shape[2], backend="torch")
        try:
            state = ttt._streaming_state
            tensors = [state.w0, state.b0, state.grad_w, state.grad_b, state.pos, state.updates]
            ptrs = [t.data_ptr() for t in tensors]
            stream.load(codes, torch.full((2,), codes.shape[2], dtype=torch.long))
            for _ in range(MB + 1):
                stream.step()
            assert [t.data_ptr() for t in tensors] == ptrs  # same addresses: a graph replay would see the updates
            assert state.pos.tolist() == [1, 1] and state.updates.tolist() == [1, 1]
            model.reset_streaming(torch.tensor([True, False]))
            assert state.pos.tolist() == [0, 1] and state.updates.tolist() == [0, 1]
            assert torch.equal(state.w0[0], ttt.w_init.detach()) and not torch.equal(state.w0[1], ttt.w_init)
            assert state.grad_w[0].abs().max() == 0 and state.grad_w[1].abs().max() > 0
        finally:
            stream.close()


def test_ttt_report_counts_updates_and_change():
    model = _ttt_model(layers=(0, 1), mini_batch=6)
    frames = 40  # floor(40 / 6) = 6 updates, 4 tokens pending
    codes = generate_codes(model, 2, frames, seed=4)
    with inference_mode(model):
        stream, tracker = _stream_through(model, codes, chunk=4)
        try:
            live = ttt_report(model)
        finally:
            stream.close()
    for report in (tracker.report(), live):
        assert set(report["layers"]) == {"transformer.layers.0.ttt", "transformer.layers.1.ttt"}
        for layer in report["layers"].values():
            assert layer["updates_applied"] == [frames // 6] * 2
            assert layer["weights_changed"] is True
            assert all(r > 0 for r in layer["relative_change"])
    assert tracker.report()["layers"]["transformer.layers.0.ttt"]["relative_change"] == pytest.approx(
        live["layers"]["transformer.layers.0.ttt"]["relative_change"], rel=1e-6
    )


def test_tracker_falls_back_on_name_for_third_party_layers():
    """A module named *ttt* without the protocol: its streaming state's float tensors are tracked by name."""
    model = _ttt_model(layers=(0,))
    ttt = model.transformer.layers[0].ttt
    ttt.__class__ = type("ForeignTTT", (TTTLinear,), {"fast_weight_tensors": None})  # no protocol: name only
    codes = generate_codes(model, 1, 3 * MB, seed=6)
    with inference_mode(model):
        stream, tracker = _stream_through(model, codes, chunk=MB)
        stream.close()
    layer = tracker.report()["layers"]["transformer.layers.0.ttt"]
    assert layer["weights_changed"] is True and layer["updates_applied"] == [3]



def test_attach_with_a_seed_leaves_the_cpu_rng_stream_unchanged():
    a, b = _ttt_model(layers=(0,)), _ttt_model(layers=(0,))  # the seed makes the new parameters reproducible
    for p, q in zip(a.transformer.layers[0].ttt.parameters(), b.transformer.layers[0].ttt.parameters(), strict=True):
        assert torch.equal(p, q)
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    attach_ttt(model, [0], mini_batch=MB, seed=1)  # seeds with 1 inside, then restores the stream
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.gpu
def test_attach_with_a_seed_leaves_the_cuda_rng_stream_unchanged():
    """torch.manual_seed inside attach_ttt reseeds the CUDA generators too: they must be restored as well."""
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    torch.cuda.manual_seed_all(123)
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(123)
    attach_ttt(model, [0], mini_batch=MB, seed=1)
    assert torch.equal(torch.rand(5, device="cuda"), expected)
