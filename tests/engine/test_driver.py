"""The streaming driver against `LMModel.forward`: frame and chunk mode, ragged batches, state, no host sync."""

from __future__ import annotations

import gc

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses

from fused_stream.core.config import EvalConfig
from fused_stream.engine import stream as stream_module
from fused_stream.engine.driver import ConstantMemoryError, StreamingEvaluator
from fused_stream.kernels.cross_entropy import triton_interpreted
from fused_stream.verify.parity import ParityError
from fused_stream.verify.reference import batch_losses

CHUNKS = [1, 3, 8, 32]
# The fused loss kernel runs here under Triton's interpreter (set in conftest); the GPU tests cover it compiled.
BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.skipif(not triton_interpreted(), reason="interpreter"),
                                                     pytest.mark.slow])]  # the interpreter: 10-25 s a case


def evaluate(model, codes, **config):
    return StreamingEvaluator(model, EvalConfig(**config)).evaluate(codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("frames", [10, 64], ids=["T<context", "T>=3xcontext"])
def test_matches_lmmodel_forward(tiny_model, make_codes, chunk, frames, backend):
    assert frames < tiny_model.context or frames >= 3 * tiny_model.context
    codes = torch.cat([make_codes(tiny_model, frames, seed=s) for s in range(2)])  # [2, K, T]
    codes[0, 3, 5] = tiny_model.zero_token_id  # a zero token in an audio stream is masked, not scored
    codes[1, 0, 7] = tiny_model.zero_token_id  # and in the text stream
    audio, text, mask, text_mask = forward_losses(tiny_model, codes)
    result = evaluate(tiny_model, codes, chunk_size=chunk, loss_backend=backend)
    assert result.report["loss_backend"] == backend
    assert result.report["scored_positions"] == int(mask.sum() + text_mask.sum())  # counted by the loss kernel
    assert result.report["bad_targets"] == result.report["nonfinite_logit_rows"] == 0
    assert torch.equal(result.valid, mask)
    assert torch.equal(result.text_valid, text_mask)
    assert_losses_close(result.losses, audio)
    assert_losses_close(result.text_losses, text)
    batch = batch_losses(tiny_model, codes)
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses)
    assert_losses_close(result.text_losses, batch.text_losses)
    assert result.losses.dtype == torch.float32 and result.losses.shape == (2, tiny_model.dep_q, frames)
    assert result.text_losses.shape == (2, 1, frames)
    assert result.lengths.tolist() == [frames, frames]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_ragged_batch_equals_each_sequence_alone(tiny_model, make_codes, chunk, backend):
    lengths = [70, 5, 33]  # B = 3; one shorter than the largest delay + a chunk, one > 3 x context
    sequences = make_codes(tiny_model, lengths, seed=1)
    result = evaluate(tiny_model, sequences, chunk_size=chunk, loss_backend=backend)
    # The kernel's own validity (position inside the sequence's length, target in the vocabulary) scores exactly
    # the positions LMModel.forward scores on each sequence alone.
    assert result.report["scored_positions"] == int(result.valid.sum() + result.text_valid.sum())
    assert result.lengths.tolist() == lengths
    batch = batch_losses(tiny_model, sequences)  # a list: LMModel.forward on each sequence alone
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses)
    assert_losses_close(result.text_losses, batch.text_losses)
    for b, seq in enumerate(sequences):
        T = seq.shape[1]
        audio, text, mask, text_mask = forward_losses(tiny_model, seq[None])
        # The padded batch computes logits at the last delays[1+k] positions of a short sequence; alone,
        # LMModel.forward masks them. The result must follow the alone semantics, and nothing past T is valid.
        assert torch.equal(result.valid[b, :, :T], mask[0])
        assert torch.equal(result.text_valid[b, :, :T], text_mask[0])
        assert not result.valid[b, :, T:].any() and result.losses[b, :, T:].isnan().all()
        assert_losses_close(result.losses[b, :, :T], audio[0])
        assert_losses_close(result.text_losses[b, :, :T], text[0])


@pytest.mark.parametrize("chunk", [1, 8])
def test_batch_size_splits_do_not_change_results(tiny_model, make_codes, chunk):
    sequences = make_codes(tiny_model, [40, 12, 25, 40, 3], seed=2)
    whole = evaluate(tiny_model, sequences, chunk_size=chunk)
    split = evaluate(tiny_model, sequences, chunk_size=chunk, batch_size=2)
    assert split.report["batches"] == 3
    assert torch.equal(whole.valid, split.valid)
    assert_losses_close(split.losses, whole.losses, atol=1e-5)
    assert_losses_close(split.text_losses, whole.text_losses, atol=1e-5)


def test_chunk_mode_needs_the_enlarged_ring(tiny_model, make_codes, monkeypatch):
    """Without `context + C - 1` ring slots the first queries of a chunk lose keys: the parity tests would see it."""
    codes = make_codes(tiny_model, 64, seed=3)
    audio, _, _, _ = forward_losses(tiny_model, codes)
    monkeypatch.setattr(stream_module, "enlarge_rings", lambda model, context_extra: None)
    with pytest.raises(ParityError, match="attention window"):  # verification stops such a run
        evaluate(tiny_model, codes, chunk_size=8)
    broken = evaluate(tiny_model, codes, chunk_size=8, verify=False)
    diff = (broken.losses.double() - audio).abs().nan_to_num(0.0).max()
    assert diff > 1e-3, "moshi's context-sized ring should make chunk mode inexact"


def test_state_bytes_do_not_grow_with_length(tiny_model, make_codes):
    short, long = make_codes(tiny_model, 100, seed=4), make_codes(tiny_model, 2000, seed=5)
    for chunk in (1, 8):
        a = evaluate(tiny_model, short, chunk_size=chunk).report["state_bytes"]
        b = evaluate(tiny_model, long, chunk_size=chunk).report["state_bytes"]
        assert a == b > 0


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable by the garbage collector (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        # type() rather than isinstance(): isinstance reads __class__, which warns on deprecated torch aliases.
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor left by an earlier test's tracing has no storage to weigh
                continue
    return sum(storages.values())


@pytest.mark.parametrize("chunk", [1, 8])
def test_live_tensor_bytes_are_flat_over_the_steps(tiny_model, make_codes, chunk):
    """Nothing accumulates step after step: all live tensors weigh the same at step 20 and at the last step."""
    codes = make_codes(tiny_model, 2000, seed=15)
    total = 2000 // chunk
    samples = {}

    def sample(done, _total):
        if done in (20, total):
            samples[done] = _live_tensor_bytes()

    evaluate(tiny_model, codes, chunk_size=chunk, progress=sample)
    assert samples[20] == samples[total] > 0


def test_chunk_mode_ring_holds_context_plus_chunk_minus_one(tiny_model, make_codes):
    codes = make_codes(tiny_model, [40, 31], seed=6)  # B = 2
    frame = evaluate(tiny_model, codes, chunk_size=1).report["state_bytes"]
    chunk = evaluate(tiny_model, codes, chunk_size=8).report["state_bytes"]
    heads = tiny_model.transformer.layers[0].self_attn.num_heads
    dim_per_head = tiny_model.dim // heads
    layers = len(tiny_model.transformer.layers)
    extra_kv = layers * 2 * 2 * heads * (8 - 1) * dim_per_head * 4  # layers x (k, v) x B x H x (C-1) x D x fp32
    extra_step = (8 - 1) * 8  # the int64 gather window [C + 1]
    assert chunk - frame == extra_kv + extra_step


def test_every_evaluate_starts_from_fresh_state(tiny_model, make_codes):
    first, second = make_codes(tiny_model, 50, seed=7), make_codes(tiny_model, 50, seed=8)
    evaluator = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4))
    alone = evaluator.evaluate(second)
    evaluator.evaluate(first)
    again = evaluator.evaluate(second)
    torch.testing.assert_close(again.losses, alone.losses, rtol=0, atol=0, equal_nan=True)


def test_model_mode_restored_and_no_autograd(tiny_model, make_codes):
    codes = make_codes(tiny_model, 20, seed=9)
    seen = []

    def inside(done, total):
        seen.append((tiny_model.training, torch.is_grad_enabled()))

    tiny_model.train()
    try:
        result = evaluate(tiny_model, codes, progress=inside)
        assert tiny_model.training  # restored
        assert not result.losses.requires_grad
    finally:
        tiny_model.eval()
    assert seen and all(mode == (False, False) for mode in seen)  # eval mode, no autograd, during the steps


def test_progress_callback_counts_host_steps(tiny_model, make_codes):
    calls = []
    sequences = make_codes(tiny_model, [20, 9, 17], seed=10)
    evaluate(
        tiny_model, sequences, chunk_size=4, batch_size=2, progress=lambda done, total: calls.append((done, total))
    )
    total = 5 + 3  # batches {20, 17} and {9}: ceil(20/4) + ceil(9/4) steps
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_progress_bar_runs(tiny_model, make_codes, capsys):
    evaluate(tiny_model, make_codes(tiny_model, 10, seed=11), progress=True)
    assert "streaming" in capsys.readouterr().err


def test_no_host_sync_inside_the_step(tiny_model, make_codes, monkeypatch):
    """Every way of reading a device value on the host raises while a step runs."""
    in_step = {"on": False}

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if in_step["on"]:
                raise AssertionError(f"host sync Tensor.{name} inside the step loop")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                 "masked_select", "unique"):
        forbid(name)
    for name in ("nonzero", "masked_select", "unique"):  # function forms: data-dependent output shapes
        original_fn = getattr(torch, name)

        def guarded_fn(*args, _original=original_fn, _name=name, **kwargs):
            if in_step["on"]:
                raise AssertionError(f"data-dependent torch.{_name} inside the step loop")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded_fn)
    original_call = stream_module.Stream.step_once

    def guarded_step(self):
        in_step["on"] = True
        try:
            original_call(self)
        finally:
            in_step["on"] = False

    monkeypatch.setattr(stream_module.Stream, "step_once", guarded_step)
    codes = make_codes(tiny_model, 30, seed=12)
    for chunk in (1, 8):
        result = evaluate(tiny_model, codes, chunk_size=chunk)
        assert result.valid.any()


@pytest.mark.parametrize(
    "field,value",
    [("chunk_size", True), ("batch_size", True), ("dtype", "cuda"), ("dtype", "int64"), ("dtype", "float33"),
     ("loss_backend", "cupy"), ("cuda_graphs", "always"), ("batch_size", "most"), ("graph_unroll", 0),
     ("verify_graph", -1), ("verify_graph", True), ("memory_limit", 0), ("monitor_interval", 0)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**{field: value}).validate()


def test_config_moves_and_casts_the_model(make_codes):
    from fused_stream.data.models import load_model

    model = load_model("tiny", device="cpu", dtype=torch.float32)
    codes = make_codes(model, 24, seed=13)
    reference = batch_losses(model, codes)
    evaluator = StreamingEvaluator(model, EvalConfig(device="cpu", dtype="float64"))
    assert model.dtype == torch.float64
    result = evaluator.evaluate(codes)
    assert_losses_close(result.losses, reference.losses)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1, 8])
def test_cuda_matches_batch_without_host_sync(make_codes, monkeypatch, chunk):
    from fused_stream.data.models import load_model

    model = load_model("tiny", device="cuda", dtype=torch.float32)
    sequences = make_codes(model, [64, 20, 45], seed=14)
    reference = batch_losses(model, sequences)
    evaluate(model, sequences, chunk_size=chunk)  # first call: moshi's lazy torch.compile, cuBLAS init
    original_call = stream_module.Stream.step_once

    def step_that_must_not_sync(self):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
        try:
            original_call(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(stream_module.Stream, "step_once", step_that_must_not_sync)
    result = evaluate(model, sequences, chunk_size=chunk, cuda_graphs="off")  # eager: __call__ runs every step
    assert torch.equal(result.valid, reference.valid)
    assert_losses_close(result.losses, reference.losses)
    assert_losses_close(result.text_losses, reference.text_losses)


@pytest.mark.parametrize(("lengths", "chunk", "verified"), [([300, 40, 7], 150, [80]), ([40, 25], 40, [40, 25])],
                         ids=["T>cap", "T<cap"])
def test_auto_chunk_matches_the_batch_path(tiny_model, make_codes, lengths, chunk, verified):
    """chunk_size="auto" (cap 256): above the cap, balanced steps (300 -> 2 x 150); below it, one step of the longest
    sequence. The verified prefix follows the resolved chunk: a 347-frame run's budget (80 frames) is less than
    C + lead + 8, so one prefix of 80 frames; two short sequences are verified whole."""
    sequences = make_codes(tiny_model, lengths, seed=31)
    report = (result := evaluate(tiny_model, sequences, chunk_size="auto")).report
    assert report["chunk_size"] == report["preflight"]["chunk_size"] == chunk
    assert report["chunk_choice"].startswith(f"auto: C={chunk} (" + ("capped" if chunk < 256 and chunk < lengths[0]
                                                                     else "= longest sequence"))
    assert report["steps"] == -(-lengths[0] // chunk)  # one batch of all the sequences
    assert report["verification"]["passed"]
    assert report["verification"]["frames"] == verified
    batch = batch_losses(tiny_model, sequences)
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses, atol=1e-4)
    assert_losses_close(result.text_losses, batch.text_losses, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The run's report: memory monitor, preflight, throughput, logging
# --------------------------------------------------------------------------------------------------------------
def test_report_carries_memory_preflight_and_throughput(tiny_model, make_codes, caplog):
    codes = make_codes(tiny_model, [40, 25], seed=20)
    with caplog.at_level("INFO", logger="fused_stream.engine.driver"):
        report = evaluate(tiny_model, codes, chunk_size=4, monitor_interval=0.01).report
    assert report["memory"]["memory_source"] == "rss" and "cpu" in report["memory"]["memory_source_reason"]
    assert report["memory"]["peak_bytes"] >= report["memory"]["baseline_bytes"] > 0
    assert report["preflight"]["batch_size"] == report["batch_size"] == 2
    assert report["preflight"]["estimate"]["kv_cache"] > 0
    assert report["preflight"]["measured_peak_increase_bytes"] is not None
    assert report["throughput"]["steps_per_second"] > 0
    assert "no bandwidth" in report["throughput"]["bound_reason"]  # CPU: no roofline, and it says why
    assert report["context_utilization"] == 1.0  # 40 frames > the tiny context of 16
    assert report["cuda_graphs"]["graphed"] is False and report["cuda_graphs"]["reason"] == "device is cpu"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("streaming 2 sequences") for m in messages)
    assert any(m.startswith("done: 65 frames") for m in messages)


@pytest.mark.slow
def test_a_20k_frame_run_has_constant_memory(tiny_model, make_codes):
    """20k frames of `tiny` (B=4 x 5000, chunk 2): the RSS slope after warm-up implies < max(1 MiB, 0.5 %)."""
    codes = make_codes(tiny_model, [5000] * 4, seed=21)
    result = evaluate(tiny_model, codes, chunk_size=2, monitor_interval=0.02, assert_constant_memory=True)
    memory = result.report["memory"]
    assert memory["memory_source"] == "rss"
    assert memory["constant_memory"] is True, memory
    assert memory["samples_after_warmup"] >= 20


def test_batch_size_auto_follows_the_memory_limit(tiny_model, make_codes):
    from fused_stream.plan.preflight import estimate_run_bytes

    codes = make_codes(tiny_model, [30] * 8, seed=22)
    per_four = estimate_run_bytes(tiny_model, 4, 1, 30).run_bytes
    small = evaluate(tiny_model, codes, batch_size="auto", memory_limit=int(per_four / 0.85) + 1).report
    large = evaluate(tiny_model, codes, batch_size="auto", memory_limit=2**40).report
    assert small["batch_size"] < large["batch_size"] == 8
    assert 1 <= small["batch_size"] <= 4


def test_a_batch_that_cannot_fit_fails_before_anything_runs(tiny_model, make_codes):
    from fused_stream.plan.preflight import PreflightError

    calls = []
    with pytest.raises(PreflightError, match="batch_size=3"):
        evaluate(tiny_model, make_codes(tiny_model, [30] * 3, seed=23), batch_size=3, memory_limit=1000,
                 progress=lambda done, total: calls.append(done))
    assert calls == []


def test_assert_constant_memory_raises_on_growth(tiny_model, make_codes, monkeypatch):
    """The driver's wiring: a monitor verdict of growth raises (the verdict logic is tested in test_monitor)."""
    from fused_stream.measure.monitor import Monitor

    def growing(self):
        return {"constant_memory": False, "implied_growth_bytes": 64 * 2**20, "tolerance_bytes": 2**20,
                "memory_source": "rss", "peak_bytes": 1, "baseline_bytes": 0}

    monkeypatch.setattr(Monitor, "report", growing)
    codes = make_codes(tiny_model, 20, seed=24)
    assert evaluate(tiny_model, codes).report["constant_memory"] is False  # reported, not raised, by default
    with pytest.raises(ConstantMemoryError, match="grew by 64.00 MiB"):
        evaluate(tiny_model, codes, assert_constant_memory=True)


@pytest.mark.gpu
def test_nvml_memory_is_flat_over_20k_frames_of_small(make_codes):
    from fused_stream.data.models import load_model

    model = load_model("small", device="cuda")  # bf16
    codes = make_codes(model, [2500] * 8, seed=30)
    result = evaluate(model, codes, batch_size=8, monitor_interval=0.05, assert_constant_memory=True)
    memory = result.report["memory"]
    assert memory["memory_source"] == "nvml", memory["memory_source_reason"]
    assert memory["constant_memory"] is True, memory
    assert memory["samples_after_warmup"] >= 10
    assert result.report["cuda_graphs"]["graphed"]


# --------------------------------------------------------------------------------------------------------------
# Out of memory: halve the batch and retry; a sequence that fails alone is recorded, not fatal
# --------------------------------------------------------------------------------------------------------------
# The out-of-memory path runs with graphs as on a CPU ("auto": eager) and rehearsed ("rehearse": the capture/replay
# control flow, the pool dropped and recreated by recover()).
GRAPH_MODES = ["auto", "rehearse"]


def _inject_oom(monkeypatch, fail_when):
    real = StreamingEvaluator._run_batch
    calls = []

    def run(self, streams, rows, batch, *args):
        calls.append(batch.shape[0])
        if fail_when(len(calls), batch.shape[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, streams, rows, batch, *args)

    monkeypatch.setattr(StreamingEvaluator, "_run_batch", run)
    return calls


@pytest.mark.parametrize("graphs", GRAPH_MODES)
def test_an_oom_halves_the_batch_and_changes_nothing(tiny_model, make_codes, monkeypatch, graphs):
    sequences = make_codes(tiny_model, [40, 37, 33, 20, 18], seed=40)
    expected = evaluate(tiny_model, sequences, chunk_size=2, batch_size=4)
    calls = _inject_oom(monkeypatch, lambda n, B: n == 1)
    saved = []
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=2, batch_size=4, cuda_graphs=graphs)).evaluate(
        sequences, on_batch=lambda rows, _: saved.append(list(rows))
    )
    assert calls == [4, 2, 2, 1]  # 4 fails; the rest of the run goes on at 2
    # Other batch sizes round differently in the batched matmuls: equal to float32 noise, masks exactly.
    assert_losses_close(result.losses, expected.losses, atol=1e-5)
    assert torch.equal(result.valid, expected.valid) and result.failed == {}
    assert result.report["out_of_memory"] == [{"batch_size": 4, "action": "retry at batch size 2"}]
    assert sorted(r for rows in saved for r in rows) == [0, 1, 2, 3, 4]  # every row reported once, after its batch
    assert result.report["cuda_graphs"]["rehearsed"] is (graphs == "rehearse")


@pytest.mark.parametrize("graphs", GRAPH_MODES)
def test_a_sequence_that_cannot_fit_alone_is_recorded_as_failed(tiny_model, make_codes, monkeypatch, graphs):
    sequences = make_codes(tiny_model, [30, 25, 10], seed=41)
    expected = evaluate(tiny_model, sequences, batch_size=2)
    _inject_oom(monkeypatch, lambda n, B: B > 1 or n == 2)  # call 2 is the longest sequence alone: fails again
    result = evaluate(tiny_model, sequences, batch_size=2, cuda_graphs=graphs)
    assert set(result.failed) == {0} and "out of memory at batch size 1" in result.failed[0]
    assert result.losses[0].isnan().all() and not result.valid[0].any()
    assert_losses_close(result.losses[1:], expected.losses[1:], atol=1e-5)
    assert result.report["cuda_graphs"]["rehearsed"] is (graphs == "rehearse")


@pytest.mark.parametrize("error", [MemoryError, torch.cuda.OutOfMemoryError])
@pytest.mark.parametrize("when", ["warm-up", "capture"])
def test_an_oom_in_warm_up_or_capture_retries_smaller_with_graphs_still_on(tiny_model, make_codes, monkeypatch,
                                                                           error, when):
    """Out of memory while the step is warmed up or captured is about the batch size, not the model: free, halve,
    retry (rehearsed, so it runs on a CPU) — never GraphCaptureError, never graphs switched off for the run."""
    from fused_stream.engine.graphs import WARMUP_CALLS, CUDAGraphed
    from fused_stream.engine.stream import Stream

    sequences = make_codes(tiny_model, [40, 37, 33, 20, 18], seed=42)
    expected = evaluate(tiny_model, sequences, chunk_size=2, batch_size=4)
    fail_at = 1 if when == "warm-up" else WARMUP_CALLS + 1  # the first warm-up call, or the captured call
    capturing = {"B": None, "calls": 0, "raised": 0}
    real_capture, real_step = CUDAGraphed.capture, Stream.step

    def capture(self):
        capturing["B"], capturing["calls"] = self.watch.batch_size, 0
        try:
            real_capture(self)
        finally:
            capturing["B"] = None

    def step(self):
        if capturing["B"] == 4:  # only the first stream (B = 4) runs out of memory
            capturing["calls"] += 1
            if capturing["calls"] == fail_at:
                capturing["raised"] += 1
                raise error("out of memory (injected)")
        real_step(self)

    monkeypatch.setattr(CUDAGraphed, "capture", capture)
    monkeypatch.setattr(Stream, "step", step)
    result = evaluate(tiny_model, sequences, chunk_size=2, batch_size=4, cuda_graphs="rehearse", verify_graph=2)
    assert capturing["raised"] == 1
    assert result.report["out_of_memory"] == [{"batch_size": 4, "action": "retry at batch size 2"}]
    graphs = result.report["cuda_graphs"]
    assert graphs["rehearsed"] and graphs["reason"] == "rehearsed on cpu"
    assert graphs["captures"] == graphs["streams_opened"] == 2  # (2, 40) and the last (1, 18)
    assert_losses_close(result.losses, expected.losses, atol=1e-5)
    assert torch.equal(result.valid, expected.valid) and result.failed == {}


def test_an_oom_frees_the_failed_stream_outside_the_except_block(tiny_model, make_codes, monkeypatch):
    """The recovery runs after the except block: the exception's traceback no longer holds the failed step's frames,
    so the failed Stream (its buffers, on CUDA its graphs) is really freed before the retry allocates a new one."""
    import sys
    import weakref

    from fused_stream.engine import driver
    from fused_stream.engine.stream import Stream

    sequences = make_codes(tiny_model, [30, 28, 20, 12], seed=43)
    real_step, real_recover = Stream.step, driver.RunStreams.recover
    failed: list[weakref.ref] = []
    seen = {}

    def step(self):
        if self.batch_size == 4 and not failed:
            failed.append(weakref.ref(self))
            raise MemoryError("out of memory (injected)")
        real_step(self)

    def recover(self):
        real_recover(self)
        seen["exception"] = sys.exc_info()[1]
        seen["stream alive"] = failed[0]() is not None

    monkeypatch.setattr(Stream, "step", step)
    monkeypatch.setattr(driver.RunStreams, "recover", recover)
    result = evaluate(tiny_model, sequences, batch_size=4)
    assert result.report["out_of_memory"] == [{"batch_size": 4, "action": "retry at batch size 2"}]
    assert seen == {"exception": None, "stream alive": False}


def test_a_ttt_model_reports_its_fast_weight_updates(make_codes):
    from fused_stream.data.models import load_model
    from fused_stream.ttt.layer import attach_ttt
    from fused_stream.ttt.tracker import ttt_hooks

    model = attach_ttt(load_model("tiny", device="cpu", dtype=torch.float32), layers=[1], mini_batch=4, seed=0)
    codes = make_codes(model, [30, 17], seed=50)
    report = StreamingEvaluator(model, EvalConfig(chunk_size=2), hooks=ttt_hooks(model)).evaluate(codes).report["ttt"]
    (layer,) = report["layers"].values()
    assert layer["weights_changed"] and len(layer["relative_change"]) == 2
    assert layer["updates_applied"] == [30 // 4, 30 // 4]  # one batch padded to 30 frames: both rows step 30 times
    plain = load_model("tiny", device="cpu", dtype=torch.float32)
    assert ttt_hooks(plain) == {} and "ttt" not in evaluate(plain, codes).report


@pytest.mark.gpu
def test_graph_unsafe_modules_are_refused_or_run_eagerly(make_codes):
    from fused_stream.data.models import load_model
    from fused_stream.engine.graphs import GraphCaptureError

    model = load_model("tiny", device="cuda", dtype=torch.float32)
    layer = model.transformer.layers[0]
    original = layer.forward

    def counting_forward(*args, **kwargs):  # a Python-side counter: a replay would never advance it
        layer.steps_seen = getattr(layer, "steps_seen", 0) + 1
        return original(*args, **kwargs)

    layer.forward = counting_forward
    codes = make_codes(model, [24], seed=51)
    with pytest.raises(GraphCaptureError, match="not graph-safe"):
        evaluate(model, codes, cuda_graphs="on")
    result = evaluate(model, codes, cuda_graphs="auto")
    assert not result.report["cuda_graphs"]["graphed"] and "graph-unsafe" in result.report["cuda_graphs"]["reason"]
