"""Ctrl-C / SIGTERM in every phase of a run stops it with 130 / 143, and `--resume` then gives the uninterrupted run's
metrics and report.

Each phase is interrupted deterministically: a patched function of that phase sends the real signal to this process
(the CLI's own handler turns it into the interrupt, raised inside that function), the first time it runs. The
reference is the same command run once without interruption.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from audio_fixtures import speech_like, write_flac
from moshi.models.compression import MimiModel

import fused_stream.cli.main as cli_main
import fused_stream.cli.run as cli_run
import fused_stream.data.audio as audio
from fused_stream.cli.main import main
from fused_stream.data.mimi import random_mimi, save_mimi_checkpoint, small_mimi_config
from fused_stream.engine.stream import Stream
from fused_stream.verify.verification import Verification

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

RUN_KEYS = ("throughput", "verification", "memory", "cuda_graphs", "preflight", "frames_per_second")


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """(argv without --out, the uninterrupted run's results.json)."""
    root = tmp_path_factory.mktemp("interrupts")
    config = small_mimi_config(card=64)
    mimi = save_mimi_checkpoint(random_mimi(config, seed=0), root / "mimi", config)
    (root / "audio" / "100" / "book").mkdir(parents=True)
    for i, seconds in enumerate((5.0, 4.0, 3.0)):
        write_flac(root / "audio" / "100" / "book" / f"chapter_{i}.flac", speech_like(seconds, 16000, seed=i), 16000)
    argv = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--audio", str(root / "audio"), "--mimi",
            str(mimi), "-q", "--checkpoint-every", "0"]
    out = root / "whole"
    assert main([*argv, "--out", str(out)]) == 0
    return argv, json.loads((out / "results.json").read_text())


def _signal_on_call(monkeypatch, owner, name, signum, on_call=1):
    """Patch `owner.name` so that its `on_call`-th call sends `signum` to this process before doing its work."""
    original = getattr(owner, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            os.kill(os.getpid(), signum)  # the handler runs at the next bytecode: here, inside this phase
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


PHASES = {
    "checks": (cli_main, "check_run", 1),
    "model load": (cli_run, "open_model", 1),
    "Mimi encoding": (MimiModel, "encode", 2),  # the first file is half encoded: never recorded as a bad file
    "cache write": (audio, "_write_cache", 2),
    "streaming": (Stream, "step_once", 30),  # mid-batch: every sequence is in the one batch (batch size auto)
    "verification": (Verification, "check", 1),
    "report writing": (cli_main, "write_reports", 1),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_an_interrupt_in_any_phase_stops_the_run_and_resume_gives_the_uninterrupted_results(
    audio_run, tmp_path, monkeypatch, capsys, phase, signum
):
    argv, whole = audio_run
    out = tmp_path / "out"
    owner, name, on_call = PHASES[phase]
    with monkeypatch.context() as patch:
        calls = _signal_on_call(patch, owner, name, signum, on_call)
        assert main([*argv, "--out", str(out)]) == 128 + signum
    assert len(calls) == on_call  # stopped right there: nothing of the phase ran again
    err = capsys.readouterr().err
    assert f"interrupted ({signal.Signals(signum).name})" in err
    assert "failed" not in err and not (out / "results.json").exists()
    if phase == "checks":
        assert "before the run started" in err
    elif phase == "streaming":  # the batch in progress was saved: the message says where it resumes
        assert "at frame" in err and "--resume" in err
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    (run,), (expected,) = resumed["models"], whole["models"]
    assert run["metrics"] == expected["metrics"]  # bit-identical float64 sums
    assert resumed["data"] == whole["data"] and resumed["failed"] == whole["failed"] == []
    report = run["report"]
    assert all(key in report for key in RUN_KEYS), sorted(set(RUN_KEYS) - set(report))
    assert [f["name"] for f in report["per_file"]] == [f["name"] for f in expected["report"]["per_file"]]
    if phase == "streaming":
        assert report["resumed_calls"] > 0  # continued from the saved state, not redone
    if phase == "report writing":  # every sequence was saved: the report is the earlier run's, marked
        assert report["resumed_sequences"] == 3 and all(f["resumed"] for f in report["per_file"])
        assert report["report_of_session"] == 1 and report["verification"]["passed"]
        assert set(report["resumed"]["sessions"]) == {"1"}


def test_nothing_saved_yet_is_said_plainly(audio_run, tmp_path, monkeypatch, capsys):
    argv, _ = audio_run
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _signal_on_call(patch, cli_run, "open_model", signal.SIGTERM)
        assert main([*argv, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "nothing was saved yet" in err and "with --resume to continue" not in err


@pytest.mark.slow
def test_a_crash_mid_batch_loses_only_what_streamed_since_the_last_save(tmp_path):
    """SIGKILL (no handler runs) in the middle of the run's one batch: --resume continues from the saved state."""
    import subprocess
    import sys
    import time

    argv = ["--generate", "2", "--frames", "400", "--threads", "1", "--checkpoint-every", "0", "-q"]
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    whole, out = tmp_path / "whole", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "fused_stream.eval", *argv, "--out", str(whole)], check=True, env=env,
                   timeout=600)
    proc = subprocess.Popen([sys.executable, "-m", "fused_stream.eval", *argv, "--out", str(out)], env=env)
    note = out / "partial" / "tiny" / "batch_in_progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(note.read_text())["frames_done"] >= 100:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    assert not list((out / "partial" / "tiny").glob("*.pt")), "the kill should land inside the one batch"
    subprocess.run([sys.executable, "-m", "fused_stream.eval", *argv, "--out", str(out), "--resume"], check=True,
                   env=env, timeout=600)
    resumed, expected = (json.loads((d / "results.json").read_text())["models"][0] for d in (out, whole))
    assert resumed["metrics"] == expected["metrics"]  # bit-identical float64 sums
    assert resumed["report"]["resumed_calls"] >= 100  # at most the calls since the last save were redone


def test_every_handler_that_catches_an_interrupt_raises_it_again():
    """`except BaseException` (or a bare except) would catch Ctrl-C / SIGTERM: each must end by re-raising. Broad
    `except Exception` handlers cannot catch them (KeyboardInterrupt and the CLI's Interrupted are BaseExceptions)."""
    import ast
    from pathlib import Path

    import fused_stream

    offenders = []
    for path in Path(fused_stream.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ExceptHandler):
                continue
            broad = node.type is None or isinstance(node.type, ast.Name) and node.type.id == "BaseException"
            if broad and not isinstance(node.body[-1], ast.Raise):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    assert issubclass(cli_main.Interrupted, BaseException) and not issubclass(cli_main.Interrupted, Exception)
