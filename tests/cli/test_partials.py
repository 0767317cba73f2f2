"""Per-sequence partial results: atomic saves, codes-checked loads, settings-checked resume."""

from __future__ import annotations

import pytest
import torch

from fused_stream.cli.partials import PartialStore, ResumeMismatchError
from fused_stream.core.config import EvalConfig
from fused_stream.core.driver import StreamingEvaluator
from fused_stream.metrics import PositionSums


def test_save_then_load_round_trips_and_checks_the_codes(tmp_path, tiny_model, make_codes):
    codes = make_codes(tiny_model, [30, 20], seed=1)
    result = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(codes)
    store = PartialStore(tmp_path, "base", {"model": "tiny"}, resume=False)
    one = PositionSums.from_result(result.row(1))
    assert one.frames == 20 and one.n_sequences == 1
    store.save("b", codes[1], one, {"combined": 1.5})
    entry = store.load("b", codes[1])
    assert entry["frames"] == 20 and entry["metrics"] == {"combined": 1.5}
    again = store.sums(entry)
    assert torch.equal(again.sums, one.sums) and torch.equal(again.counts, one.counts)
    assert store.load("a", codes[0]) is None  # never saved
    other = codes[1].clone()
    other[1, 5] = (other[1, 5] + 1) % tiny_model.card
    assert store.load("b", other) is None  # saved for other codes: recomputed, never reused
    assert not list(store.dir.glob("*.tmp*"))


def test_resume_requires_the_same_settings_and_a_fresh_run_starts_clean(tmp_path, tiny_model, make_codes):
    codes = make_codes(tiny_model, [12], seed=2)
    result = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(codes)
    store = PartialStore(tmp_path, "m", {"model": "tiny", "chunk_size": 1}, resume=False)
    store.save("x", codes[0], PositionSums.from_result(result.row(0)), {})
    resumed = PartialStore(tmp_path, "m", {"model": "tiny", "chunk_size": 1}, resume=True)
    assert resumed.load("x", codes[0]) is not None
    with pytest.raises(ResumeMismatchError, match="chunk_size"):
        PartialStore(tmp_path, "m", {"model": "tiny", "chunk_size": 4}, resume=True)
    fresh = PartialStore(tmp_path, "m", {"model": "tiny", "chunk_size": 4}, resume=False)
    assert fresh.load("x", codes[0]) is None
