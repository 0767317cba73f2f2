"""`evaluate_long_context_loss`: the CLI's numbers from one call, and the model handed back exactly as it came."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import fused_stream.api as api
from fused_stream import evaluate_long_context_loss
from fused_stream.cli.main import main
from fused_stream.core.config import ConfigError, EvalConfig
from fused_stream.data.codes import generate_codes
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.errors import DataError
from fused_stream.metrics import PositionSums, compute_metrics, position_means
from fused_stream.verify.parity import ParityError
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

DEP_Q, K, CARD = 8, 17, 64  # the tiny preset
TOL = 1e-9


def read_cli_outputs(out) -> tuple[dict, dict]:
    """(metrics of the one model in results.json, per_position.csv as {column: list}) of a CLI run."""
    metrics = json.loads((out / "results.json").read_text())["models"][0]["metrics"]
    with (out / "per_position.csv").open() as f:
        rows = list(csv.DictReader(f))
    curves: dict[str, list] = {}
    for name in rows[0]:
        if name == "position":
            continue
        cast = int if name == "count" else float
        curves[name] = [None if row[name] == "" else cast(row[name]) for row in rows]
    return metrics, curves


def assert_close(a, b, path="") -> None:
    """Recursive equality of JSON-like values, floats to TOL (None == None, never NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isfinite(a) and abs(a - b) <= TOL, (path, a, b)
    else:
        assert a == b, (path, a, b)




@pytest.fixture
def restore_model(tiny_model):
    """The tiny model is session-wide: put back every flag a test changes."""
    training = [(m, m.training) for m in tiny_model.modules()]
    grads = [(p, p.requires_grad) for p in tiny_model.parameters()]
    yield tiny_model
    for m, flag in training:
        m.training = flag
    for p, flag in grads:
        p.requires_grad_(flag)


def test_same_flat_keys_metrics_and_curves_as_the_cli(tiny_model, tmp_path):
    """Three [8, T] audio-code tensors and one full [17, T] layout, through the API and through `--codes DIR`."""
    g = torch.Generator().manual_seed(1)
    audio = [torch.randint(0, CARD, (DEP_Q, T), generator=g) for T in (1200, 1150, 1250)]
    full = generate_codes(tiny_model, 1, 4200, seed=2)[0]  # long enough for librilight_slope_early at window 100
    codes_list = [*audio, full]
    data = tmp_path / "codes"
    data.mkdir()
    for i, codes in enumerate(codes_list):  # names sort like the list: the CLI sorts files by name
        torch.save(codes, data / f"seq_{i}.pt")
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--codes", str(data), "--window", "100",
            "--chunk-size", "16", "--codebook-weights", "100,1,1,1,1,1,1,1", "--out", str(out), "-q"]
    assert main(argv) == 0
    cli_metrics, cli_curves = read_cli_outputs(out)

    result = evaluate_long_context_loss(tiny_model, codes_list, chunk_size=16, window=100,
                                        codebook_weights=[100, 1, 1, 1, 1, 1, 1, 1])

    flat = {k: v for k, v in result.items() if k.startswith("librilight_")}
    assert set(result) == set(flat) | {"per_position", "metrics", "report"}
    assert_close(flat, cli_metrics["flat"])
    assert {"librilight_loss_1k", "librilight_loss_4k", "librilight_slope_early"} <= set(flat)
    assert flat["librilight_samples"] == 4
    assert_close(result["metrics"], cli_metrics)  # windows, first_frames, slopes, overall (with weighted)
    assert result["metrics"]["slopes"]["all"] is not None
    assert_close(result["per_position"], cli_curves)
    assert len(result["per_position"]["combined"]) == 4200
    json.dumps(result["per_position"], allow_nan=False)  # JSON-ready: None, never NaN
    assert result["report"]["path"] == "streaming" and result["report"]["chunk_size"] == 16


def test_frame_mode_defaults_match_the_driver_and_metrics(tiny_model):
    """Default arguments (frame mode): the numbers are the driver's, through PositionSums and compute_metrics."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, CARD, (DEP_Q, 30), generator=g)
    b = torch.randint(0, CARD, (1, 12, 24), generator=g)  # a leading batch dim of 1, more codebooks than dep_q
    result = evaluate_long_context_loss(tiny_model, [a, b])
    laid = torch.full((2, K, 30), tiny_model.zero_token_id, dtype=torch.long)
    laid[0, 1 : 1 + DEP_Q] = a
    laid[1, 1 : 1 + DEP_Q, :24] = b[0, :DEP_Q]
    direct = StreamingEvaluator(tiny_model, EvalConfig()).evaluate([laid[0], laid[1, :, :24]])
    sums = PositionSums.from_result(direct)
    # issue 21: the metrics also carry the bootstrap's additions (uncertainty, its signature, warnings)
    added = {"uncertainty", "bootstrap", "warnings"}
    assert added <= set(result["metrics"]) and result["metrics"]["uncertainty"]["loss_combined"]["stderr"] > 0
    ours = {k: v for k, v in result["metrics"].items() if k not in added}
    ours["flat"] = {k: v for k, v in ours["flat"].items() if not k.endswith("_stderr")}  # the bootstrap's too
    assert_close(ours, compute_metrics(sums, context=tiny_model.context, window=1000))
    curves = position_means(sums)
    for name, curve in curves.items():
        expected = [int(v) if name == "count" else (None if math.isnan(v) else float(v)) for v in curve.tolist()]
        assert_close(result["per_position"][name], expected, name)
    assert set(result["per_position"]) == set(curves) and "weighted" not in curves
    assert result["per_position"]["count"][:24] == [2] * 24 and result["per_position"]["count"][24:] == [1] * 6
    assert result["per_position"]["text"] == [None] * 30  # text_fill="zero": the text stream is never scored
    # 30 frames: no window of 1000 fits, so no window key; the overall loss is there whatever the length, and the
    # version of the definitions; never a placeholder value
    assert {k for k in result if k.startswith("librilight_")} == {
        "librilight_samples", "librilight_loss_overall", "librilight_metrics_version",
        "librilight_loss_overall_stderr"}  # two sequences: two units of the bootstrap
    assert result["librilight_loss_overall"] == result["metrics"]["overall"]["combined"]
    assert result["librilight_metrics_version"] == 2
    assert result["report"]["chunk_size"] == 1


def test_fill_and_crop_options_follow_the_layout(tiny_model):
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, CARD, (DEP_Q, 20), generator=g)
    padded = evaluate_long_context_loss(tiny_model, [a], text_fill="pad", other_fill="copy", max_frames=12)
    assert len(padded["per_position"]["combined"]) == 12
    assert padded["per_position"]["text"][0] is not None  # the padding id is scored as text
    assert "text" in padded["metrics"]["overall"]
    with pytest.raises(ConfigError, match="text_fill"):
        evaluate_long_context_loss(tiny_model, [a], text_fill="nope")


def test_model_state_is_restored(restore_model, monkeypatch):
    model = restore_model
    device, dtype = model.device, model.dtype
    model.train()
    model.depformer.eval()  # a submodule in its own mode: a plain model.train(was) would flatten this
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)
    expected_training = [m.training for m in model.modules()]
    expected_grad = [p.requires_grad for p in params]
    before = [p.detach().clone() for p in params]

    # Something inside the call that toggles flags (as a hook or a TTT layer might) must not leak out.
    original = StreamingEvaluator.evaluate

    def meddling(self, codes):
        for p in self.model.parameters():
            p.requires_grad_(not p.requires_grad)
        self.model.train()
        return original(self, codes)

    monkeypatch.setattr(api.StreamingEvaluator, "evaluate", meddling)
    codes = torch.randint(0, CARD, (DEP_Q, 10), generator=torch.Generator().manual_seed(5))
    result = evaluate_long_context_loss(model, [codes], chunk_size=4)
    assert result["librilight_samples"] == 1

    assert [m.training for m in model.modules()] == expected_training
    assert [p.requires_grad for p in params] == expected_grad
    assert model._streaming_state is None and not api.is_streaming(model)
    assert model.device == device and model.dtype == dtype
    assert all(p.device == device and p.dtype == dtype for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)


def test_state_is_restored_when_the_run_fails(restore_model, monkeypatch):
    model = restore_model
    model.train()
    flags = [p.requires_grad for p in model.parameters()]

    def boom(self, codes):
        self.model.eval()
        self.model.streaming_forever(1)  # a failure that leaves the model streaming
        for p in self.model.parameters():
            p.requires_grad_(False)
        raise RuntimeError("boom")

    monkeypatch.setattr(api.StreamingEvaluator, "evaluate", boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_long_context_loss(model, [torch.zeros(DEP_Q, 9, dtype=torch.long)])  # [8, 8] is ambiguous
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert not api.is_streaming(model)


def test_bad_input_is_refused_before_the_run(tiny_model):
    codes = torch.zeros(DEP_Q, 9, dtype=torch.long)  # 9 > 8 rows: [8, 8] is refused as ambiguous
    with pytest.raises(ValueError, match="empty"):
        evaluate_long_context_loss(tiny_model, [])
    with pytest.raises(ValueError, match="expected \\[n_codebooks, T\\]"):
        evaluate_long_context_loss(tiny_model, [torch.zeros(2, DEP_Q, 5, dtype=torch.long)])
    with pytest.raises(DataError, match="dep_q=8"):
        evaluate_long_context_loss(tiny_model, [torch.zeros(4, 5, dtype=torch.long)])
    with pytest.raises(ValueError, match="max_frames"):
        evaluate_long_context_loss(tiny_model, [codes], max_frames=0)
    with pytest.raises(ValueError, match="window"):
        evaluate_long_context_loss(tiny_model, [codes], window=0)
    with pytest.raises(ValueError, match="codebook_weights"):
        evaluate_long_context_loss(tiny_model, [codes], codebook_weights=[1.0, 2.0])
    with tiny_model.streaming(1):
        with pytest.raises(ValueError, match="streaming mode"):
            evaluate_long_context_loss(tiny_model, [codes])
    assert tiny_model._streaming_state is None


def test_options_are_eval_configs(tiny_model, monkeypatch):
    """A config, keyword options over it, EvalConfig's defaults (batch_size "auto"), and clear errors."""
    codes = torch.randint(0, CARD, (DEP_Q, 12), generator=torch.Generator().manual_seed(6))
    built, init = [], StreamingEvaluator.__init__

    def spy(self, model, config=None, **kwargs):
        built.append((config, kwargs))
        init(self, model, config, **kwargs)

    monkeypatch.setattr(StreamingEvaluator, "__init__", spy)
    evaluate_long_context_loss(tiny_model, [codes])
    (config, kwargs), = built
    assert config == EvalConfig() and config.batch_size == "auto" and kwargs == {"hooks": {}}  # no TTT layers
    by_config = evaluate_long_context_loss(tiny_model, [codes], EvalConfig(chunk_size=4, window=5))
    by_name = evaluate_long_context_loss(tiny_model, [codes], chunk_size=4, window=5)
    overridden = evaluate_long_context_loss(tiny_model, [codes], EvalConfig(chunk_size=2, window=5), chunk_size=4)
    assert_close(by_config["metrics"], by_name["metrics"])
    assert_close(overridden["metrics"], by_name["metrics"])
    assert by_name["report"]["chunk_size"] == 4
    with pytest.raises(TypeError, match="'chunksize'.*'chunk_size'"):
        evaluate_long_context_loss(tiny_model, [codes], chunksize=4)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_long_context_loss(tiny_model, [codes], batch_size=0)
    with pytest.raises(ConfigError, match="dtype"):
        evaluate_long_context_loss(tiny_model, [codes], dtype="bfloat16")  # would cast the caller's model


def _toy_layers():
    """tests/toy_layers.py (shared toy layers), loaded by path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("api_toy_layers", Path(__file__).parent / "toy_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_model_that_streams_wrong_raises_parity_error_and_is_handed_back():
    from fused_stream.data.models import load_model

    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)  # its own: a layer is swapped in
    model.transformer.layers[1] = _toy_layers().ForwardOnlyTTT(model.transformer.layers[1])
    model.train()
    model.depformer.eval()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    training, grads = [m.training for m in model.modules()], [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(7)
    codes = [torch.randint(0, CARD, (DEP_Q, T), generator=g) for T in (40, 30)]

    with pytest.raises(ParityError) as info:
        evaluate_long_context_loss(model, codes, chunk_size=4)
    assert info.value.sequence == 0 and info.value.stream.startswith("audio codebook")  # text_fill="zero"
    assert not api.is_streaming(model)
    assert [m.training for m in model.modules()] == training and [p.requires_grad for p in params] == grads

    result = evaluate_long_context_loss(model, codes, chunk_size=4, verify=False)  # runs, silently wrong
    assert result["report"]["verification"] == {"skipped": "verify=False"}
    assert result["librilight_samples"] == 2 and not api.is_streaming(model)
    assert _largest_gap_to_batch(model, codes, result) > 1e-3


def _largest_gap_to_batch(model, codes, result) -> float:
    """Largest |API curve - batch path| of audio codebook 1's per-position mean over sequences."""
    batch = batch_losses(model, api.prepare_codes(model, codes, EvalConfig()))
    expected = batch.losses[:, 1].nanmean(dim=0).tolist()
    return max(abs(a - b) for a, b in zip(result["per_position"]["codebook_1"], expected, strict=True)
               if a is not None)


def test_a_correct_model_passes_verification_by_default(tiny_model):
    codes = [torch.randint(0, CARD, (DEP_Q, 40), generator=torch.Generator().manual_seed(8))]
    result = evaluate_long_context_loss(tiny_model, codes, chunk_size=4)
    report = result["report"]["verification"]
    assert report["passed"] and report["sequences"] == [0] and report["positions"] > 0
    assert _largest_gap_to_batch(tiny_model, codes, result) < 1e-4


def test_flat_keys_get_stderr_companions_from_two_sequences_on(tiny_model):
    """Issue 21: each flat loss and slope key gets `{key}_stderr` (a bootstrap over the sequences), for logging
    error bars over training; one sequence gives none (nothing to resample)."""
    g = torch.Generator().manual_seed(5)
    codes = [torch.randint(0, CARD, (DEP_Q, T), generator=g) for T in (1100, 1060, 1120)]
    result = evaluate_long_context_loss(tiny_model, codes, chunk_size=16, window=100, verify=False)
    assert result["librilight_loss_1k_stderr"] > 0
    assert "librilight_samples_stderr" not in result
    assert {k.removesuffix("_stderr") for k in result if k.endswith("_stderr")} == {
        k for k in result if k.startswith("librilight_") and not k.endswith("_stderr")} - {
        "librilight_samples", "librilight_metrics_version"}
    entry = result["metrics"]["uncertainty"]["librilight_loss_1k"]
    assert entry["stderr"] == result["librilight_loss_1k_stderr"] and entry["n_units"] == 3
    alone = evaluate_long_context_loss(tiny_model, codes[:1], chunk_size=16, window=100, verify=False)
    assert not any(k.endswith("_stderr") for k in alone)
