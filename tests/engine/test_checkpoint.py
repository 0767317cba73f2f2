"""Bounded loss: a batch interrupted mid-stream and continued from its saved state gives an uninterrupted run's losses.

The reference is the same evaluator run without interruption; the comparison is bit for bit (`torch.equal` on the
losses, NaN where invalid): the restored stream must see exactly the tensors and call counts it would have seen.
"""

from __future__ import annotations

import pytest
import torch

from fused_stream.core.config import EvalConfig
from fused_stream.data.models import load_model
from fused_stream.engine.checkpoint import capture_state, restore_state
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.ttt.layer import attach_ttt
from fused_stream.ttt.tracker import ttt_hooks


class MemoryStore:
    """`engine.checkpoint.StreamCheckpoints` in memory, counting what the driver does with it."""

    def __init__(self) -> None:
        self.state, self.saves, self.clears = None, 0, 0

    def load_stream(self):
        return self.state

    def save_stream(self, state):
        self.state, self.saves = state, self.saves + 1

    def clear_stream(self):
        self.state, self.clears = None, self.clears + 1


def _interrupt_after(calls: int):
    def progress(done, _total):
        if done == calls:
            raise KeyboardInterrupt

    return progress


def _run_interrupted(model, codes, calls, hooks=None, **options):
    """Evaluate `codes`, interrupted after `calls` calls, then resume the sequences not saved whole, as the CLI does;
    {sequence index: (losses, text_losses)} of both parts, and the store."""
    store, saved = MemoryStore(), {}

    def keep(rows, result, todo):
        for row in rows:
            saved[todo[row]] = (result.losses[row].clone(), result.text_losses[row].clone())

    todo = list(range(len(codes)))
    config = EvalConfig(checkpoint_every=0, progress=_interrupt_after(calls), **options)
    with pytest.raises(KeyboardInterrupt):
        StreamingEvaluator(model, config, hooks=hooks).evaluate(
            codes, on_batch=lambda rows, result: keep(rows, result, todo), checkpoints=store)
    assert store.state is not None and store.state["calls_done"] > 0, "the interrupt should land mid-batch"
    interrupted_at = store.state["calls_done"]
    todo = [i for i in range(len(codes)) if i not in saved]
    result = StreamingEvaluator(model, EvalConfig(checkpoint_every=0, **options), hooks=hooks).evaluate(
        [codes[i] for i in todo], on_batch=lambda rows, result: keep(rows, result, todo), checkpoints=store)
    assert result.report["resumed_calls"] == interrupted_at  # continued from the save, not redone
    assert store.state is None  # every batch saved whole: no state left behind
    return saved, result


def _assert_same_as_uninterrupted(model, codes, saved, **options):
    whole = StreamingEvaluator(model, EvalConfig(**options)).evaluate(codes)
    for i in range(len(codes)):
        T = codes[i].shape[1]
        losses, text = saved[i]
        assert torch.equal(losses[:, :T].nan_to_num(-1), whole.losses[i, :, :T].nan_to_num(-1)), f"sequence {i}"
        assert torch.equal(text[:, :T].nan_to_num(-1), whole.text_losses[i, :, :T].nan_to_num(-1)), f"sequence {i}"


@pytest.mark.parametrize(("calls", "resumed_at", "options"), [
    (7, 6, {"batch_size": 2}),  # mid first batch (the longest two), before its verification pause (call 40)
    (55, 54, {"batch_size": 2}),  # mid first batch, after the verified prefix: compared from the restored losses
    (75, 10, {"batch_size": 2}),  # mid second batch (call 11 of 37), after the first was saved whole
    (5, 4, {"batch_size": 2, "chunk_size": 4}),  # chunk mode: ring caches of context + C - 1 slots
    (9, 8, {"batch_size": 3, "cuda_graphs": "rehearse"}),  # the graph control flow: restored in place, checked
])
def test_a_batch_interrupted_mid_stream_resumes_to_the_uninterrupted_losses(tiny_model, make_codes, one_torch_thread,
                                                                           calls, resumed_at, options):
    codes = make_codes(tiny_model, [64, 50, 37], seed=3)
    saved, result = _run_interrupted(tiny_model, codes, calls, **options)
    assert result.report["resumed_calls"] == resumed_at  # checkpoint_every=0: saved after every call but the last
    # The first row of the first batch is always verified: after the verification pause (calls=55), on the losses
    # the interrupted run streamed and the resumed one restored.
    assert result.report["verification"]["passed"] and 0 in result.report["verification"]["sequences"]
    _assert_same_as_uninterrupted(tiny_model, codes, saved, **options)


def test_ttt_fast_weights_are_part_of_the_saved_state(make_codes, one_torch_thread):
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    attach_ttt(model, layers=[0, 1], mini_batch=4, seed=1)
    codes = make_codes(model, [45, 30], seed=5)
    hooks = ttt_hooks(model)
    saved, result = _run_interrupted(model, codes, 13, hooks=hooks, batch_size=2)
    _assert_same_as_uninterrupted(model, codes, saved, batch_size=2)
    # The tracker saw the batch from its reset state: the change of the fast weights covers the whole sequence.
    whole = StreamingEvaluator(model, EvalConfig(batch_size=2), hooks=ttt_hooks(model)).evaluate(codes)
    assert result.report["ttt"] == whole.report["ttt"]


def test_a_state_saved_from_another_stream_shape_is_refused_before_anything_is_written(tiny_model, make_codes):
    codes = torch.stack(make_codes(tiny_model, [20, 20], seed=1))
    lengths = torch.tensor([20, 20])
    one = Stream(tiny_model, 2, 1, 20, "torch")
    try:
        one.load(codes, lengths)
        with torch.no_grad():  # as the driver streams (runtime.inference_mode)
            for _ in range(5):
                one.step()
                one.calls_done += 1
        state = capture_state(one, ["a", "b"])
    finally:
        one.close()
    other = Stream(tiny_model, 2, 4, 20, "torch")
    try:
        other.load(codes, lengths)
        before = other.losses.clone()
        with pytest.raises(ValueError, match="saved for a stream"):
            restore_state(other, state)
        assert other.calls_done == 0 and int(other.pos) == 0 and torch.equal(other.losses.isnan(), before.isnan())
    finally:
        other.close()


def test_a_saved_batch_that_does_not_fit_the_run_is_redone_with_a_warning(tiny_model, make_codes, caplog):
    codes = make_codes(tiny_model, [30, 20], seed=2)
    store = MemoryStore()
    with pytest.raises(KeyboardInterrupt):
        StreamingEvaluator(tiny_model, EvalConfig(batch_size=2, checkpoint_every=0, progress=_interrupt_after(4))
                           ).evaluate(codes, checkpoints=store)
    result = StreamingEvaluator(tiny_model, EvalConfig(batch_size=1, checkpoint_every=0)).evaluate(
        codes, checkpoints=store)
    assert result.report["resumed_calls"] == 0
    assert "exceeds this run's batch size 1" in caplog.text
    whole = StreamingEvaluator(tiny_model, EvalConfig(batch_size=1)).evaluate(codes)
    assert torch.equal(result.losses.nan_to_num(-1), whole.losses.nan_to_num(-1))


def test_without_a_store_or_with_inf_nothing_is_saved_mid_batch(tiny_model, make_codes):
    codes = make_codes(tiny_model, [30, 20], seed=2)
    store = MemoryStore()
    result = StreamingEvaluator(tiny_model, EvalConfig(checkpoint_every=float("inf"))).evaluate(codes,
                                                                                                checkpoints=store)
    assert store.saves == 0 and result.report["checkpoints"]["saves"] == 0


def test_a_save_that_fails_on_disk_is_reported_and_the_run_goes_on(tiny_model, make_codes, caplog):
    class FullDisk(MemoryStore):
        def save_stream(self, state):
            raise OSError(28, "No space left on device")

    codes = make_codes(tiny_model, [20], seed=2)
    result = StreamingEvaluator(tiny_model, EvalConfig(checkpoint_every=0)).evaluate(codes, checkpoints=FullDisk())
    whole = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(codes)
    assert torch.equal(result.losses.nan_to_num(-1), whole.losses.nan_to_num(-1))
    assert len(result.report["checkpoints"]["failed_saves"]) == 19 and result.report["checkpoints"]["saves"] == 0
    assert "No space left on device" in caplog.text and "could not save the batch in progress" in caplog.text
