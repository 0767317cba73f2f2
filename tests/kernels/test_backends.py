"""The loss backends' registry: one record read by the config, the plan, the CLI's checks, the preflight and the
step; a backend added by a test (or a user) is accepted everywhere without touching any of them."""

from __future__ import annotations

import pytest
import torch
from reference_ce import assert_losses_close, forward_losses

from fused_stream.cli.main import build_parser
from fused_stream.core.config import ConfigError, EvalConfig, make_plan
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.kernels import backends
from fused_stream.kernels.cross_entropy import step_cross_entropy_torch_, triton_interpreted
from fused_stream.plan.preflight import RUNTIME_OVERHEAD, estimate_run_bytes

EXTRA = 64 * 1024**2  # the dummy's bytes per step: more than any other phase of `tiny`, so the estimate shows them


@pytest.fixture
def dummy():
    """A backend that scores with the torch twin, counts its calls, runs on the CPU only and claims EXTRA bytes."""
    calls = []

    def step(*args):
        calls.append(args[0].shape)
        step_cross_entropy_torch_(*args)

    record = backends.register(backends.LossBackend(
        name="dummy", summary="a test's", step=step, extra_bytes=lambda logits, itemsize: EXTRA,
        unavailable=lambda device: None if device.type == "cpu" else "dummy runs on the CPU only",
        auto_priority=-1))
    yield record, calls
    backends.unregister("dummy")


def test_builtin_backends_resolve():
    cpu = torch.device("cpu")
    assert list(backends.LOSS_BACKENDS) == ["auto", "torch", "triton"]
    assert backends.resolve_backend("auto", cpu) == "torch"
    assert backends.resolve_backend("torch", cpu) == "torch"
    assert backends.resolve_backend("auto", torch.device("cuda"), planned=True) == "triton"
    with pytest.raises(ValueError, match="loss_backend must be one of auto, torch, triton"):
        backends.resolve_backend("cuda", cpu)
    if triton_interpreted():
        assert backends.resolve_backend("triton", cpu) == "triton"
        with pytest.raises(RuntimeError, match="unset it"):  # the interpreter cannot drive a GPU
            backends.resolve_backend("triton", torch.device("cuda"))
    with pytest.raises(ValueError, match="taken"):
        backends.register(backends.loss_backend("torch"))


def test_dummy_backend_is_accepted_everywhere(dummy, tiny_model, make_codes):
    record, calls = dummy
    cpu = torch.device("cpu")
    assert "dummy" in backends.LOSS_BACKENDS and backends.resolve_backend("auto", cpu) == "torch"  # never auto
    config = EvalConfig(loss_backend="dummy")  # the config's choices read the registry
    assert build_parser().parse_args(["--loss-backend", "dummy"]).loss_backend == "dummy"  # and the CLI's
    assert make_plan(config, cpu).loss_backend == "dummy"
    with pytest.raises(RuntimeError, match="CPU only"):
        make_plan(config, torch.device("cuda"))
    # The preflight adds the record's bytes to the output phase: hand-computed text + 2 x audio logits (fp32).
    B, C = 2, 3
    estimate = estimate_run_bytes(tiny_model, B, C, 30, loss_backend="dummy")
    output = B * C * (tiny_model.text_card + 2 * tiny_model.dep_q * tiny_model.card) * 4  # fp32 logits
    assert estimate.activations == output + EXTRA + RUNTIME_OVERHEAD
    # The evaluator's steps go through the record, and score what LMModel.forward scores.
    codes = make_codes(tiny_model, 20, seed=3)  # [1, K, T]
    audio, text, _, _ = forward_losses(tiny_model, codes)
    result = StreamingEvaluator(tiny_model, EvalConfig(loss_backend="dummy")).evaluate(codes)
    assert result.report["loss_backend"] == "dummy" and len(calls) >= 20  # one call per frame (warm-ups aside)
    assert_losses_close(result.losses, audio)
    assert_losses_close(result.text_losses, text)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_backend"):
        EvalConfig(loss_backend="dummy")  # not registered (the fixture is not used here)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--loss-backend", "dummy"])
