"""After `--resume`, results.json holds what an uninterrupted run's holds: TTT statistics per sequence (labelled by
name, in data order), throughput, verification, memory, with what earlier runs computed marked `resumed`.

The reference is the same command run once without interruption; the interrupt is a real SIGINT sent from inside
the saving of the second sequence (so the first was saved by the interrupted run, the others by the resumed one).
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from fused_stream.cli.main import main
from fused_stream.cli.partials import PartialStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

ARGV = ["--model", "ttt=tiny", "--ttt", "ttt:layers=0,1,mb=4", "--generate", "3", "--frames", "48",
        "--batch-size", "1", "-q"]
RUN_KEYS = ("throughput", "verification", "memory", "cuda_graphs", "preflight", "frames_per_second", "steps")


def _report(out):
    return json.loads((out / "results.json").read_text())["models"][0]["report"]


def test_a_resumed_run_reports_ttt_per_sequence_and_marks_what_earlier_runs_computed(tmp_path, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main([*ARGV, "--out", str(whole)]) == 0
    expected = _report(whole)
    saves, original = [], PartialStore.save

    def save(self, *args, **kwargs):
        saves.append(args[0])
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # raised here: the second sequence is not saved
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PartialStore, "save", save)
        assert main([*ARGV, "--out", str(out)]) == 130
    assert main([*ARGV, "--out", str(out), "--resume"]) == 0
    report = _report(out)
    first = saves[0]
    names = [f["name"] for f in expected["per_file"]]
    assert [f["name"] for f in report["per_file"]] == names
    assert [f["resumed"] for f in report["per_file"]] == [name == first for name in names]
    assert [f["session"] for f in report["per_file"]] == [1 if name == first else 2 for name in names]
    assert report["resumed_sequences"] == 1 and report["resumed"]["sequences"] == 1
    earlier = report["resumed"]["sessions"]["1"]  # what the interrupted run measured before it stopped
    # Two batches streamed (the second's save was interrupted), one saved.
    assert earlier["interrupted"] and earlier["sequences"] == [first] and earlier["batches"] == 2
    assert earlier["frames_streamed"] == 2 * 48 and earlier["verification"]["passed"]
    assert earlier["memory"]["memory_source"] == report["memory"]["memory_source"]
    assert all(key in report for key in RUN_KEYS)
    assert report["verification"]["passed"]
    # TTT: every sequence, by name, in data order, with the uninterrupted run's numbers.
    assert set(report["ttt"]["layers"]) == set(expected["ttt"]["layers"]) == {
        "transformer.layers.0.ttt", "transformer.layers.1.ttt"}
    for layer, stats in report["ttt"]["layers"].items():
        reference = expected["ttt"]["layers"][layer]
        assert stats["sequences"] == reference["sequences"] == names
        assert stats["resumed"] == [name == first for name in names] and not any(reference["resumed"])
        assert stats["updates_applied"] == reference["updates_applied"]
        assert stats["relative_change"] == reference["relative_change"]
        assert stats["weights_changed"] and reference["weights_changed"]


def test_an_uninterrupted_runs_ttt_statistics_are_the_trackers_labelled_by_sequence(tmp_path):
    """The per-sequence lists are the TTTTracker's own numbers (same run, streaming order = data order here)."""
    import torch

    from fused_stream.core.config import EvalConfig
    from fused_stream.data.codes import generate_codes
    from fused_stream.data.models import load_model
    from fused_stream.engine.driver import StreamingEvaluator
    from fused_stream.options.settings import parse_ttt
    from fused_stream.ttt.layer import attach_ttt
    from fused_stream.ttt.tracker import ttt_hooks

    out = tmp_path / "out"
    assert main([*ARGV, "--out", str(out)]) == 0
    report = _report(out)
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    attach_ttt(model, seed=0, **parse_ttt("ttt:layers=0,1,mb=4")[1])
    codes = generate_codes(model, 3, 48, seed=0)
    tracker = StreamingEvaluator(model, EvalConfig(batch_size=1), hooks=ttt_hooks(model)).evaluate(
        list(codes)).report["ttt"]
    for layer, stats in report["ttt"]["layers"].items():
        assert stats["updates_applied"] == tracker["layers"][layer]["updates_applied"]
        assert stats["relative_change"] == pytest.approx(tracker["layers"][layer]["relative_change"], rel=1e-6)


def test_when_every_earlier_run_was_interrupted_its_measurements_are_the_report():
    """Every sequence saved by a run interrupted afterwards (before its report): the resumed run streams nothing and
    reports what that run measured, marked."""
    from fused_stream.cli.resumed_report import resumed_report

    entries = [{"name": name, "frames": 10, "metrics": {"combined": 1.0},
                "report": json.dumps({"session": 1, "ttt": {"L": {"updates_applied": 10, "relative_change": 0.5}}})}
               for name in ("a", "b")]
    sessions = {1: {"interrupted": True, "sequences": ["b", "a"], "memory": {"peak_bytes": 7}, "seconds": 3.0}}
    report = resumed_report({"device": "cpu", "resumed_sequences": 2}, entries, sessions, None)
    assert report["report_of_session"] == 1 and report["memory"] == {"peak_bytes": 7} and report["device"] == "cpu"
    assert [(f["name"], f["session"], f["resumed"]) for f in report["per_file"]] == [("a", 1, True), ("b", 1, True)]
    assert report["resumed"] == {"sequences": 2, "sessions": {"1": sessions[1]}}
    assert report["ttt"]["layers"]["L"] == {"sequences": ["a", "b"], "updates_applied": [10, 10],
                                            "relative_change": [0.5, 0.5], "weights_changed": True,
                                            "resumed": [True, True]}
