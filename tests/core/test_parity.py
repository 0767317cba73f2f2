"""--verify: streamed losses against LMModel.forward on a prefix; it passes on the real driver and catches errors."""

from __future__ import annotations

import pytest

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


def _deep_bf16_proxy(layers: int):
    """A moshi-structured random model of `layers` temporal layers, small dims, in bf16 (as load_model builds it)."""
    import torch
    from moshi.models.lm import LMModel

    from fused_stream.data.models import preset_config

    torch.manual_seed(0)
    cfg = preset_config("small") | {"num_layers": layers, "dim": 128, "num_heads": 4, "depformer_dim": 64,
                                    "depformer_num_heads": 4, "depformer_dim_feedforward": 256,
                                    "depformer_num_layers": 1}
    return LMModel(**cfg, device="cpu", dtype=torch.bfloat16).eval()


def test_bf16_tolerance_passes_a_deep_proxy_and_fails_a_one_frame_shift(make_codes):
    from fused_stream.core.parity import parity_tolerance

    model = _deep_bf16_proxy(32)
    sequences = make_codes(model, [64, 64], seed=1)
    result = StreamingEvaluator(model, EvalConfig()).evaluate(sequences)  # frame mode: the one that rounds apart
    report = check_parity(model, sequences, result, frames=64)
    assert report.passed and report.max_abs_diff > 0  # bf16 does round differently, and that is accepted
    assert report.tolerance == parity_tolerance(model) and 0.1 < report.tolerance < 0.3
    result.losses[:, :, 1:] = result.losses[:, :, :-1].clone()  # misaligned by one frame, masks left as they were
    result.text_losses[:, :, 1:] = result.text_losses[:, :, :-1].clone()
    shifted = check_parity(model, sequences, result, frames=64)
    assert not shifted.passed and shifted.max_abs_diff > 5 * shifted.tolerance


def test_tolerance_grows_with_depth_and_fp32_keeps_its_floor(tiny_model):
    from fused_stream.core.parity import FP32_FLOOR, parity_tolerance

    assert parity_tolerance(tiny_model) == FP32_FLOOR
    shallow, deep = parity_tolerance(_deep_bf16_proxy(2)), parity_tolerance(_deep_bf16_proxy(8))
    assert deep == pytest.approx(2 * shallow)  # sqrt(8 / 2)
