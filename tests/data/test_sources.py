"""data/sources: one registered object per data source; a source added by a test goes through `load_dataset`'s
common handling (max_files, min_frames, the crop, collected failures, shards) without touching it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fused_stream.data import sources
from fused_stream.data.codes import generate_codes
from fused_stream.data.dataset import load_dataset
from fused_stream.errors import DataError


@pytest.fixture
def planted(tiny_model):
    """A source `planted={name: codes [K, T]}` with its own option `poison` (a name whose load fails)."""
    calls: list[str] = []

    def open_planted(request: sources.Request) -> tuple[list[sources.Item], sources.Loader]:
        table = list(request.value.items())[: request.max_files]
        items = [sources.Item(i, name, [], codes.shape[1]) for i, (name, codes) in enumerate(table)]

        def load(item: sources.Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
            calls.append(item.name)
            if item.name == request.options["poison"]:
                raise DataError(f"{item.name} is poisoned")
            return table[item.index][1], []

        return items, load

    sources.register(sources.DataSource(name="planted", options=("poison",), progress="planting",
                                        open=open_planted, lays_out=False))
    yield calls
    sources.unregister("planted")


def test_builtin_sources_are_registered():
    assert set(sources.SOURCES) == {"audio", "codes", "generate"}
    assert sources.SOURCES["audio"].options == ("mimi", "concat_chapters", "cache_dir", "device", "selection")
    assert not sources.SOURCES["generate"].lays_out  # generated codes are already in the model's layout
    with pytest.raises(ValueError, match="taken"):
        sources.register(sources.SOURCES["codes"])


def test_a_registered_source_gets_the_common_handling(planted, tiny_model):
    codes = generate_codes(tiny_model, 4, 30, seed=1)
    table = {"a": codes[0], "b": codes[1, :, :5], "c": codes[2], "d": codes[3]}
    data = load_dataset(tiny_model, planted=table, poison="c", max_frames=20, min_frames=10, on_error="collect")
    assert [s.name for s in data.sequences] == ["a", "d"] and data.total == 4
    assert torch.equal(data.sequences[1].codes, codes[3, :, :20])  # cropped by load_dataset, not by the source
    assert [(f["name"], f["reason"]) for f in data.failed] == [
        ("b", "5 frames, shorter than min_frames (--min-frames) 10"), ("c", "c is poisoned")]
    # max_files reaches the source; a rank loads its own share only (balanced by the estimates).
    assert [s.name for s in load_dataset(tiny_model, planted=table, poison=None, max_files=1).sequences] == ["a"]
    planted.clear()
    shard = load_dataset(tiny_model, planted=table, poison=None, min_frames=1, shard=(1, 2))
    assert planted == [s.name for s in shard.sequences] and 0 < len(planted) < 4
    with pytest.raises(DataError, match="exactly one of .*--planted"):
        load_dataset(tiny_model, planted=table, generate=2, frames=3)
    with pytest.raises(TypeError, match="unexpected keyword arguments: bogus"):
        load_dataset(tiny_model, planted=table, bogus=1)
