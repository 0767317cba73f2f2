"""Per-sequence partial results: atomic saves, codes-checked loads, settings-checked resume."""

from __future__ import annotations

import pytest
import torch

from fused_stream.cli.partials import PartialStore, ResumeMismatchError
from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
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


def test_labels_that_differ_only_in_dropped_characters_get_their_own_folders(tmp_path):
    from fused_stream.cli.partials import store_name

    labels = ["a/b", "a_b", "a?b", "a b", "A_b", "ab", ".", "..", "", "-x", "é", "e", "x" * 300]
    names = [store_name(label) for label in labels]
    assert len(set(names)) == len(labels)
    assert len({n.casefold() for n in names}) == len(labels)  # also where the file system ignores case
    assert store_name("tiny") == "tiny" and store_name("base-1.5_b") == "base-1.5_b"  # readable labels kept
    assert all("/" not in n and n not in (".", "..", "") and len(n) <= 64 for n in names)
    dirs = {PartialStore(tmp_path, label, {"label": label}, resume=False).dir for label in labels}
    assert len(dirs) == len(labels) and all(d.parent == tmp_path / "partial" for d in dirs)


def test_resume_names_what_changed_and_refuses_an_unreadable_record(tmp_path):
    weights = {"size": 1, "mtime_ns": 2, "sha256_sampled": "a" * 64}
    PartialStore(tmp_path, "m", {"model_weights": weights, "chunk_size": 1}, resume=False)
    changed = {"model_weights": weights | {"mtime_ns": 3}, "chunk_size": 4}
    with pytest.raises(ResumeMismatchError, match=r"chunk_size: 1 -> 4, model_weights: the file changed on disk"):
        PartialStore(tmp_path, "m", changed, resume=True)
    (tmp_path / "partial" / "m" / "run.json").write_text("{not json")
    with pytest.raises(ResumeMismatchError, match="cannot read"):
        PartialStore(tmp_path, "m", changed, resume=True)


def test_a_saved_sequence_whose_source_file_changed_is_recomputed(tmp_path, tiny_model, make_codes, caplog):
    import logging
    import os

    codes = make_codes(tiny_model, [10], seed=3)
    result = StreamingEvaluator(tiny_model, EvalConfig()).evaluate(codes)
    source = tmp_path / "f0.pt"
    torch.save(codes[0], source)
    store = PartialStore(tmp_path, "m", {"model": "tiny"}, resume=False)
    store.save("f0", codes[0], PositionSums.from_result(result.row(0)), {}, [str(source)])
    assert store.load("f0", codes[0], [str(source)]) is not None
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # rewritten in place
    with caplog.at_level(logging.WARNING):
        assert store.load("f0", codes[0], [str(source)]) is None
    assert "f0.pt" in caplog.text and "recomputing" in caplog.text
    assert store.load("f0", codes[0], [str(source), str(tmp_path / "f1.pt")]) is None  # other files now
