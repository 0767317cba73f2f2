"""--verify: streamed losses against LMModel.forward on a prefix; it passes on the real driver and catches errors."""

from __future__ import annotations

from fused_stream.core.config import EvalConfig
from fused_stream.core.driver import StreamingEvaluator
from fused_stream.core.parity import check_parity


def test_parity_passes_on_whole_and_cropped_sequences(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [60, 25], seed=1)
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4)).evaluate(sequences)
    whole = check_parity(tiny_model, sequences, result, frames=100)
    assert whole.passed and whole.masks_identical and whole.sequences == 2
    cropped = check_parity(tiny_model, sequences, result, frames=30)  # 60 cropped to 30, 25 compared whole
    assert cropped.passed and 0 < cropped.positions < whole.positions


def test_parity_catches_a_shifted_loss_and_a_wrong_mask(tiny_model, make_codes):
    sequences = make_codes(tiny_model, [40], seed=2)
    result = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(sequences)
    result.losses[0, 3, 10] += 1e-3
    report = check_parity(tiny_model, sequences, result, frames=40)
    assert not report.passed and report.masks_identical and report.max_abs_diff > 5e-4
    result = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(sequences)
    result.valid[0, 0, 5] = ~result.valid[0, 0, 5]
    assert not check_parity(tiny_model, sequences, result, frames=40).masks_identical
