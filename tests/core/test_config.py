"""EvalConfig: one declaration of every option (defaults, choices from their consumers, validation) and its Plan."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from fused_stream.core import config, inputs
from fused_stream.core.config import (
    ConfigError,
    EvalConfig,
    make_plan,
    parse_batch_size,
    parse_chunk_size,
    parse_weights,
)
from fused_stream.kernels import backends


def _choices(name: str):
    return next(f.metadata["choices"] for f in fields(EvalConfig) if f.name == name)


def test_choice_lists_are_the_consumers_own():
    assert _choices("loss_backend") is backends.LOSS_BACKENDS  # the registry of kernels/backends
    assert _choices("cuda_graphs") is config.GRAPH_MODES
    assert _choices("invalid_tokens") is inputs.INVALID_TOKEN_POLICIES
    assert _choices("text_fill") is inputs.TEXT_FILLS and _choices("other_fill") is inputs.OTHER_FILLS


@pytest.mark.parametrize(
    "name, value",
    [("chunk_size", 0), ("chunk_size", True), ("chunk_size", 2.0), ("batch_size", 0), ("batch_size", "all"),
     ("batch_size", False), ("loss_backend", "cuda"), ("cuda_graphs", "sometimes"), ("graph_unroll", 0),
     ("verify_graph", -1), ("verify_graph", True), ("invalid_tokens", "ignore"), ("memory_limit", 0),
     ("monitor_interval", 0), ("max_frames", 0), ("text_fill", "blank"), ("other_fill", "noise"), ("window", 0),
     ("codebook_weights", [0.0, 0.0]), ("codebook_weights", [1.0, -1.0]), ("dtype", "int64"), ("dtype", "float33"),
     ("verify", "yes"), ("verify", 1), ("verify_frames", 0), ("verify_frames", True), ("verify_frames", 1.5),
     ("chunk_size", "Auto")],
)
def test_a_bad_value_is_a_config_error_naming_the_option(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        EvalConfig(**{name: value})
    config = EvalConfig()
    setattr(config, name, value)  # mutated after construction: caught again before a run
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        config.validate()


def test_defaults():
    config = EvalConfig()
    assert config.batch_size == "auto" and config.chunk_size == 1 and config.window == 1000
    assert EvalConfig(batch_size=None).batch_size is None  # Python callers may still ask for all at once
    # Verification on by default, with an automatic prefix; both are command-line options of "the run".
    assert config.verify is True and config.verify_frames is None
    options = {f.name: f.metadata for f in fields(EvalConfig)}
    assert options["verify"]["cli"] and options["verify_frames"]["cli"] and options["verify_frames"]["parse"] is int


def test_parsers():
    assert parse_batch_size("auto") == "auto" and parse_batch_size("8") == 8
    with pytest.raises(ConfigError, match="batch_size"):
        parse_batch_size("eight")
    assert parse_chunk_size("auto") == "auto" and parse_chunk_size("64") == 64
    with pytest.raises(ConfigError, match="^chunk_size must be an integer >= 1 or 'auto'"):
        parse_chunk_size("sixty-four")
    options = {f.name: f.metadata for f in fields(EvalConfig)}
    assert options["chunk_size"]["parse"] is parse_chunk_size  # the CLI's --chunk-size and config files
    assert parse_weights("100,1,1") == [100.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="codebook_weights"):
        parse_weights("1,x")


def test_plan_resolves_once_for_the_device():
    cpu = torch.device("cpu")
    plan = make_plan(EvalConfig(chunk_size=4, graph_unroll=3), cpu)
    assert (plan.loss_backend, plan.graphs, plan.graph_reason) == ("torch", False, "device is cpu")
    assert plan.frames_per_call == 12 and not plan.strict_graphs
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_plan(EvalConfig(cuda_graphs="on"), cpu)
    with pytest.raises(AttributeError):
        plan.graphs = True  # frozen: nothing after the evaluator's construction changes the plan


def test_auto_chunk_is_allowed_and_planned_as_frame_mode_until_the_lengths_are_known():
    config = EvalConfig(chunk_size="auto")
    assert config.chunk_size == "auto" and EvalConfig().chunk_size == 1  # frame mode stays the default
    assert make_plan(config, torch.device("cpu")).chunk_size == 1  # the driver resolves it (plan.chunk_choice)


def test_rehearse_plans_graphs_on_any_device():
    """cuda_graphs="rehearse": the capture/replay control flow with eager calls, strict like "on", on a CPU too."""
    plan = make_plan(EvalConfig(cuda_graphs="rehearse"), torch.device("cpu"))
    assert plan.graphs and plan.rehearse and plan.strict_graphs and plan.graph_reason == "rehearsed on cpu"
    assert not make_plan(EvalConfig(cuda_graphs="auto"), torch.device("cpu")).rehearse
    assert "rehearse" in _choices("cuda_graphs")  # and so in the CLI's --cuda-graphs choices
