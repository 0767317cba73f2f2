"""The graph runner: mode resolution, eager fallback, replay verification (CPU), and graph == eager (GPU)."""

from __future__ import annotations

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses
from toy_layers import PythonSideTTT, RebindingTTT, Wrapped

from fused_stream.core.alignment import valid_masks
from fused_stream.core.config import DISABLE_ENV, EvalConfig, graphs_wanted, make_plan
from fused_stream.core.inputs import pad_batch
from fused_stream.core.runtime import inference_mode
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.graphs import (
    WARMUP_CALLS,
    CUDAGraphed,
    GraphCaptureError,
    GraphMismatchError,
    GraphPool,
    first_difference,
    verify_replay,
)
from fused_stream.engine.stream import Stream

NAMES = ["text"] + [f"audio codebook {k}" for k in range(8)]
# The CPU graph tests run twice: eagerly ("auto" on a CPU) and through the rehearsed capture/replay ("rehearse").
MODES = ["auto", "rehearse"]


def test_graph_mode_resolution(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graphs_wanted("auto", cpu) == (False, "device is cpu")
    assert graphs_wanted("off", cuda) == (False, "cuda_graphs='off'")
    assert graphs_wanted("auto", cuda) == (True, "captured")
    assert graphs_wanted("on", cuda) == (True, "captured")
    assert graphs_wanted("rehearse", cpu) == (True, "rehearsed on cpu")
    assert graphs_wanted("rehearse", cuda) == (True, "rehearsed on cuda")
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


def _graphed(stream, mode):
    """The step as the driver wraps it: eager ("auto" on a CPU) or rehearsed, captured already."""
    if mode == "auto":
        return _eager(stream)
    graphed = CUDAGraphed(stream.step, stream.reset, GraphPool(torch.device("cpu"), rehearse=True), strict=True,
                          watch=stream)
    graphed.capture()
    assert graphed.graphed  # the rehearsed graph stands where a CUDA graph would
    return graphed


def _run(graphed, stream, T):
    for _ in range(stream.n_calls):
        graphed()
    return stream.host_losses(T)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_falls_back_to_eager_and_stays_exact(tiny_model, make_codes, mode):
    sequences = make_codes(tiny_model, [37, 22], seed=1)
    with inference_mode(tiny_model):
        stream, batch, lengths = _loaded_stream(tiny_model, sequences, chunk=4)
        try:
            plan = make_plan(EvalConfig(cuda_graphs=mode), torch.device("cpu"))
            if mode == "auto":
                assert not plan.graphs and plan.graph_reason == "device is cpu"
                graphed = _eager(stream)
                graphed.capture()  # no pool: nothing to capture
                assert not graphed.graphed
            else:
                assert plan.graphs and plan.rehearse and plan.strict_graphs
                assert plan.graph_reason == "rehearsed on cpu"
                graphed = _graphed(stream, mode)
            audio, text, _ = _run(graphed, stream, batch.shape[-1])
        finally:
            stream.close()
    valid, text_valid = valid_masks(tiny_model, batch, lengths)
    for b, seq in enumerate(sequences):
        ref_audio, ref_text, _, _ = forward_losses(tiny_model, seq[None])
        T = seq.shape[1]
        assert_losses_close(torch.where(valid[b, :, :T], audio[b, :, :T], torch.nan)[None], ref_audio)
        assert_losses_close(torch.where(text_valid[b, :, :T], text[b, :, :T], torch.nan)[None], ref_text)


@pytest.mark.parametrize("mode", MODES)
def test_a_reset_stream_is_bit_identical_to_a_fresh_one(tiny_model, make_codes, mode):
    """One Stream serves every batch of its shape: load() after another batch must not leak any state (rehearsed:
    nor move a tensor the captured step reads)."""
    first, second = make_codes(tiny_model, [60, 60], seed=2), make_codes(tiny_model, [45, 60], seed=3)
    with inference_mode(tiny_model):
        fresh, batch, _ = _loaded_stream(tiny_model, second, chunk=8, capacity=64)
        try:
            graphed = _graphed(fresh, mode)
            expected = _run(graphed, fresh, batch.shape[-1])
        finally:
            fresh.close()
        reused, other, other_lengths = _loaded_stream(tiny_model, first, chunk=8, capacity=64)
        try:
            graphed = _graphed(reused, mode)
            _run(graphed, reused, other.shape[-1])
            reused.load(*pad_batch(tiny_model, second))
            got = _run(graphed, reused, batch.shape[-1])
        finally:
            reused.close()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b)


@pytest.mark.parametrize("mode", MODES)
def test_verify_replay_passes_for_two_eager_runs(tiny_model, make_codes, mode):
    sequences = make_codes(tiny_model, [30, 30], seed=4)
    with inference_mode(tiny_model):
        stream, _, _ = _loaded_stream(tiny_model, sequences, chunk=2)
        try:
            graphed = _graphed(stream, mode)
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk,unroll", [(1, 3), (4, 5)])
def test_unrolled_steps_pad_and_mask(tiny_model, make_codes, chunk, unroll, mode):
    """graph_unroll=U pads each batch to a multiple of C*U frames; the padded steps score nothing."""
    sequences = make_codes(tiny_model, [41, 23, 17], seed=6)
    base = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=chunk, batch_size=2)).evaluate(sequences)
    unrolled = StreamingEvaluator(
        tiny_model, EvalConfig(chunk_size=chunk, batch_size=2, graph_unroll=unroll, verify_graph=4, cuda_graphs=mode)
    ).evaluate(sequences)
    assert torch.equal(unrolled.valid, base.valid)
    assert torch.equal(unrolled.losses.view(torch.int32), base.losses.view(torch.int32))
    assert torch.equal(unrolled.text_losses.view(torch.int32), base.text_losses.view(torch.int32))
    assert unrolled.report["scored_positions"] == base.report["scored_positions"]
    assert unrolled.report["steps"] % unroll == 0
    assert unrolled.report["cuda_graphs"]["verified_calls"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_is_opened_once_per_shape(tiny_model, make_codes, mode):
    sequences = make_codes(tiny_model, [50, 48, 40, 39, 12], seed=7)  # B = 2: shapes (2, 50), (2, 40), (1, 12)
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, batch_size=2, cuda_graphs=mode)).evaluate(
        sequences)
    graphs = result.report["cuda_graphs"]
    assert graphs["streams_opened"] == 2  # the (2, 40) batch reuses the (2, 50) stream
    if mode == "rehearse":  # a second shape in one run: a second (rehearsed) capture into the run's pool
        assert graphs["captures"] == 2 and graphs["rehearsed"] and not graphs["graphed"]
        assert graphs["reason"] == "rehearsed on cpu" and graphs["capture_seconds"] > 0
        assert graphs["graphed_seconds"] > 0 and graphs["eager_seconds"] == 0
    else:
        assert graphs["captures"] == 0 and not graphs["rehearsed"] and not graphs["graphed"]


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
@pytest.mark.parametrize("chunk", [1, 8])
def test_graph_equals_eager_bitwise_across_the_ring_wrap(make_codes, chunk):
    """`small`'s structure with a context of 256 (bf16): every call of a batch that wraps the ring is replayed and
    compared with an eager call (every fill bucket's graph, the full-ring one included), and the graphed run equals
    an eager run bit for bit: both attend over the same fill bucket (patches/ring_attention.py)."""
    from moshi.models.lm import LMModel

    from fused_stream.data.models import preset_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LMModel(**(preset_config("small") | {"context": 256}), device="cuda", dtype=torch.bfloat16).eval()
    codes = make_codes(model, [320 + 8 * chunk, 301], seed=12)
    common = {"chunk_size": chunk, "batch_size": 2, "verify": False}
    eager = StreamingEvaluator(model, EvalConfig(cuda_graphs="off", **common)).evaluate(codes)
    result = StreamingEvaluator(model, EvalConfig(cuda_graphs="on", verify_graph=10**6, **common)).evaluate(codes)
    graphs = result.report["cuda_graphs"]
    assert graphs["graphed"] and graphs["verified_calls"] == -(-(320 + 8 * chunk) // chunk)
    assert torch.equal(result.losses.view(torch.int32), eager.losses.view(torch.int32))
    assert torch.equal(result.text_losses.view(torch.int32), eager.text_losses.view(torch.int32))


@pytest.mark.gpu
def test_capture_falls_back_when_the_model_syncs(make_codes, monkeypatch, caplog):
    from fused_stream.data.models import load_model
    from fused_stream.verify.reference import batch_losses

    model = load_model("tiny", device="cuda", dtype=torch.float32)
    codes = make_codes(model, [40, 33], seed=10)
    original = model.forward_text

    def forward_text_that_syncs(sequence, *args, **kwargs):
        out = original(sequence, *args, **kwargs)
        out[0].sum().item()  # a host read: legal eagerly, fatal to capture
        return out

    monkeypatch.setattr(model, "forward_text", forward_text_that_syncs)
    with caplog.at_level("WARNING", logger="fused_stream.engine.graphs"):
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


# --------------------------------------------------------------------------------------------------------------
# Rehearsal (cuda_graphs="rehearse", any device): the capture/replay control flow on the CPU, and the defects it
# must catch before a first GPU run does
# --------------------------------------------------------------------------------------------------------------
def test_a_short_first_batch_rehearses_its_warm_up_inside_the_buffer(tiny_model, make_codes, monkeypatch):
    """T = 8 <= 2 * C * U (C = 4): the warm-up's third call runs past the batch. With Stream.step_once's clamp the
    rehearsed run is exact; without it the warm-up reads past the delayed buffer (on CUDA: a device-side assert)."""
    sequences = make_codes(tiny_model, [8], seed=62)
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, cuda_graphs="rehearse", verify_graph=2)).evaluate(
        sequences)
    assert result.report["cuda_graphs"]["rehearsed"] and result.report["cuda_graphs"]["verified_calls"] == 2
    ref_audio, ref_text, _, _ = forward_losses(tiny_model, sequences[0][None])
    assert_losses_close(result.losses, ref_audio)
    assert_losses_close(result.text_losses, ref_text)

    real_init = Stream.__init__

    def init_without_the_clamp(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.last_column = 10**9  # clamp(max=...) no longer clamps

    monkeypatch.setattr(Stream, "__init__", init_without_the_clamp)
    # The safety check's 3 steps (or the warm-up's 3 calls) are the first to read past the buffer.
    with pytest.raises((IndexError, GraphCaptureError), match="out of range"):
        StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, cuda_graphs="rehearse")).evaluate(sequences)


@pytest.fixture
def fresh_model():
    from fused_stream.data.models import load_model

    # The toys below are attached in place: never the session-wide tiny_model.
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=0)


class _LateRebindingTTT(RebindingTTT):
    """Updates in place, but rebinds from its 9th call on: after the driver's 3-step check, 3 warm-ups, capture."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__(layer)
        self.calls = torch.zeros((), dtype=torch.long)  # a device counter: not itself a defect

    def after(self, y: torch.Tensor) -> None:
        self.calls.add_(1)
        if self.calls.item() > 8:  # noqa: PLR2004 - a host read, legal eagerly
            self.fast = self.fast + y.mean()
        else:
            self.fast.add_(y.mean())


def _attach(model, toy):
    layers = model.transformer.layers
    layers[1] = toy(layers[1])
    return layers[1]


@pytest.mark.parametrize("toy", [PythonSideTTT, RebindingTTT])
def test_rehearsal_refuses_graph_unsafe_modules(fresh_model, make_codes, toy):
    """The driver's safety check, rehearsed: "rehearse" refuses like "on" would on a GPU; "auto" on a CPU runs."""
    _attach(fresh_model, toy)
    codes = make_codes(fresh_model, [24], seed=63)
    with pytest.raises(GraphCaptureError, match=r"cuda_graphs='rehearse' but these modules are not graph-safe"):
        StreamingEvaluator(fresh_model, EvalConfig(cuda_graphs="rehearse")).evaluate(codes)
    assert StreamingEvaluator(fresh_model, EvalConfig()).evaluate(codes).valid.any()


@pytest.mark.parametrize("toy", [PythonSideTTT, RebindingTTT])
def test_a_rehearsed_capture_catches_what_moves_during_the_step(fresh_model, make_codes, toy):
    """Without the driver's safety check (a bare CUDAGraphed): the rehearsed capture itself fails like "on"."""
    module = _attach(fresh_model, toy)
    sequences = make_codes(fresh_model, [12], seed=64)
    with inference_mode(fresh_model):
        stream, _, _ = _loaded_stream(fresh_model, sequences, chunk=2)
        try:
            pool = GraphPool(torch.device("cpu"), rehearse=True)
            graphed = CUDAGraphed(stream.step, stream.reset, pool, strict=True, watch=stream)
            kind = "python_value" if isinstance(module, PythonSideTTT) else "rebound_tensor"
            with pytest.raises(GraphCaptureError, match=rf"during the captured call(.|\n)*layers\.1\.\w+: {kind}"):
                graphed.capture()
            lenient = CUDAGraphed(stream.step, stream.reset, GraphPool(torch.device("cpu"), rehearse=True),
                                  watch=stream)
            lenient.capture()  # not strict: runs eagerly and says why, like a failed capture on a GPU
            assert not lenient.graphed and "capture failed" in lenient.reason
        finally:
            stream.close()


def test_rehearsal_catches_a_rebinding_the_safety_check_misses(fresh_model, make_codes):
    """A module that misbehaves only from its 9th call passes the driver's 3-step check; every rehearsed capture and
    replay is checked against the first capture (one per fill bucket, see patches/ring_attention.py), so the run fails
    at the capture or replay that would have gone wrong."""
    _attach(fresh_model, _LateRebindingTTT)
    codes = make_codes(fresh_model, [24], seed=65)
    with pytest.raises(GraphCaptureError,
                       match=r"during (replay \d+|the captured call)(.|\n)*layers\.1\.fast: rebound_tensor"):
        StreamingEvaluator(fresh_model, EvalConfig(cuda_graphs="rehearse")).evaluate(codes)


def test_rehearsal_catches_a_tensor_rebound_by_reset(fresh_model, make_codes, monkeypatch):
    """Rebinding in reset() (between capture and replay, or between batches) also leaves a real replay behind."""
    module = _attach(fresh_model, Wrapped)
    module.register_buffer("fast", torch.zeros(4))

    def after(y):
        module.fast.add_(y.mean())

    module.after = after
    real_reset = Stream.reset

    def reset_that_rebinds(self):
        real_reset(self)
        module.fast = torch.zeros(4)

    codes = make_codes(fresh_model, [24], seed=66)
    monkeypatch.setattr(Stream, "reset", reset_that_rebinds)
    with pytest.raises(GraphCaptureError, match=r"between capture and replay 1(.|\n)*layers\.1\.fast: rebound"):
        StreamingEvaluator(fresh_model, EvalConfig(cuda_graphs="rehearse")).evaluate(codes)


def test_rehearsal_costs_normal_runs_nothing(tiny_model, make_codes, monkeypatch):
    """Only rehearse mode takes snapshots: an "auto" run on a CPU never does."""
    from fused_stream.engine import graphs as graphs_module
    from fused_stream.engine import graphsafe

    sequences = make_codes(tiny_model, [20], seed=67)
    taken = []
    real = graphsafe.snapshot
    for module in (graphs_module, graphsafe):  # the rehearsed graph's checks and the safety probe
        monkeypatch.setattr(module, "snapshot", lambda model: taken.append(1) or real(model))
    StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4)).evaluate(sequences)
    assert taken == []
    StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4, cuda_graphs="rehearse")).evaluate(sequences)
    assert len(taken) >= 2 * (20 // 4)  # two per rehearsed call
