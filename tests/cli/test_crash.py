"""cli/crash.py: an exception that is not one of the package's own errors is a bug or a fault, never bad input: the
command prints its traceback and the versions, and exits 3 (2 is bad input). A user's mistake stays one line, 2."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

import fused_stream.cli.compare as compare_module
import fused_stream.engine.driver as driver_module
from fused_stream import __version__
from fused_stream.cli.compare import main as compare
from fused_stream.cli.crash import INTERNAL_ERROR
from fused_stream.cli.main import main
from fused_stream.cli.uncertainty import BootstrapSettings, ModelSequences, bootstrap_models, unit_ids
from fused_stream.core.config import ConfigError
from fused_stream.data.models import load_model, preset_config, save_checkpoint
from fused_stream.engine.driver import ConstantMemoryError, StreamingEvaluator
from fused_stream.engine.graphs import GraphMismatchError

RUN = ["--generate", "1", "--frames", "8", "--no-verify", "-q"]

FAULTS = [RuntimeError("boom"), IndexError("index 9 is out of bounds for dimension 0 with size 8")]
if hasattr(torch, "AcceleratorError"):  # what torch >= 2.8 raises for a device-side assert
    FAULTS.append(torch.AcceleratorError("CUDA error: device-side assert triggered"))


def _assert_internal_error(err: str, exc: BaseException, program: str) -> None:
    assert "Traceback (most recent call last)" in err
    assert f"{type(exc).__name__}: {exc}" in err  # the exception itself, as Python prints it
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{program}: internal error ({type(exc).__name__}") and "please report" in last
    for part in (f"fused_stream {__version__}", f"torch {torch.__version__}", f"moshi {metadata.version('moshi')}",
                 f"CUDA {torch.version.cuda or 'none'}", "device "):
        assert part in last, part
    assert not any(line.startswith("error:") for line in err.splitlines())  # not dressed as bad input


@pytest.mark.parametrize("exc", FAULTS, ids=lambda e: type(e).__name__)
def test_an_error_deep_in_the_run_prints_its_traceback_and_versions_and_exits_3(tmp_path, capsys, monkeypatch,
                                                                                  exc):
    def fault(*args, **kwargs):
        raise exc

    monkeypatch.setattr(driver_module, "fill_rows", fault)  # inside the driver's batch loop
    out = tmp_path / "out"
    assert main([*RUN, "--out", str(out)]) == INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    _assert_internal_error(err, exc, "fused_stream.eval")
    assert "fill_rows" in err  # the traceback reaches the line that failed
    assert not (out / ".lock").exists() and not (out / "results.json").exists()


@pytest.mark.parametrize("verdict", [ConstantMemoryError("memory grew by 3.00 MiB over the run"),
                                     GraphMismatchError("CUDA graph replay differs from eager at (batch 0, text, 3)")],
                         ids=lambda e: type(e).__name__)
def test_a_verdict_on_the_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch, verdict):
    """Memory that grew under --assert-constant-memory, a graph replay unlike eager: the run's numbers are not to be
    trusted, as when the verification fails: exit 1 and the verdict, not an internal error."""
    def judge(*args, **kwargs):
        raise verdict

    monkeypatch.setattr(driver_module, "fill_rows", judge)
    assert main([*RUN, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {verdict}"


@pytest.mark.parametrize("argv,match", [
    (["--device", "mps"], "--device mps: fused_stream runs on cpu or cuda"),
    (["--codes", "no/such/codes"], "no/such/codes"),
])
def test_a_users_mistake_is_still_one_line_and_exit_2(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("error:") and match in err


def test_a_model_the_engine_cannot_stream_is_bad_input_not_an_internal_error(tmp_path, capsys, no_model_load):
    """The driver's refusal of a model without a finite attention context reached main as a bare ValueError after
    the model loaded; it is the package's ConfigError now, and the checks ask it of the config before any load."""
    config = preset_config("tiny") | {"context": None}
    ckpt = save_checkpoint(load_model("tiny", device="cpu", seed=0), tmp_path / "ckpt", config)
    with pytest.raises(ConfigError, match="context=None"):
        StreamingEvaluator(load_model(ckpt, device="cpu"))
    out = tmp_path / "out"
    assert main(["--model", str(ckpt), *RUN, "--out", str(out)]) == 2  # no_model_load: refused before any load
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"error: --model {ckpt}: ") and "context=None" in err
    assert not out.exists()


def test_compare_reports_an_internal_error_as_one(tmp_path, capsys, monkeypatch):
    exc = KeyError("label")

    def fault(*args, **kwargs):
        raise exc

    monkeypatch.setattr(compare_module, "load_runs", fault)
    assert compare([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 3
    _assert_internal_error(capsys.readouterr().err, exc, "fused_stream.compare")


def test_compare_of_folders_without_results_is_bad_input(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"models": []}))
    assert compare([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("error:") and str(tmp_path / "b") in err


def test_a_bad_baseline_or_cluster_is_the_packages_config_error(tmp_path):
    """They reached compare's main as bare ValueErrors: now ConfigError (still a ValueError), so exit 2 stays."""
    with pytest.raises(ConfigError, match="--baseline 'nope' is not a model of this run"):
        bootstrap_models([ModelSequences("a", tmp_path, {})], [], BootstrapSettings(baseline="nope"))
    with pytest.raises(ConfigError, match="--cluster must be one of"):
        unit_ids([], "galaxy")
