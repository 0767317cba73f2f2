"""Mimi checkpoints: the saved format, the content hash, broken checkpoints named in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from fused_stream.data.mimi import load_mimi, random_mimi, save_mimi_checkpoint, small_mimi_config
from fused_stream.errors import DataError

CARD = 64  # the tiny preset's audio card


@pytest.fixture(scope="module")
def mimi_ckpt(tmp_path_factory):
    config = small_mimi_config(card=CARD)
    return save_mimi_checkpoint(random_mimi(config, seed=0), tmp_path_factory.mktemp("mimi") / "ckpt", config)


def test_mimi_checkpoint_format_and_hash(mimi_ckpt, tmp_path):
    assert sorted(p.name for p in mimi_ckpt.iterdir()) == ["config.json", "mimi.safetensors"]
    config = json.loads((mimi_ckpt / "config.json").read_text())
    assert config["weights"] == "mimi.safetensors" and config["quantizer"]["bins"] == CARD
    mimi, digest = load_mimi(mimi_ckpt, 4)
    assert not mimi.training and mimi.num_codebooks == 4 and mimi.cardinality == CARD and mimi.frame_size == 1920
    assert re.fullmatch("[0-9a-f]{64}", digest) and load_mimi(mimi_ckpt, 8)[1] == digest
    changed = tmp_path / "ctx"
    shutil.copytree(mimi_ckpt, changed)
    config["transformer"]["context"] = 100  # same weights, another model: another hash
    (changed / "config.json").write_text(json.dumps(config))
    assert load_mimi(changed, 8)[1] != digest


def test_broken_mimi_checkpoints(tmp_path, mimi_ckpt):
    with pytest.raises(DataError, match="Mimi checkpoint .*nowhere not found"):
        load_mimi(tmp_path / "nowhere", 8)
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(DataError, match="has no config.json"):
        load_mimi(tmp_path / "noconfig", 8)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"seanet": {}, "sample_rate": 24000}))
    with pytest.raises(DataError, match="lacks quantizer, transformer, channels, frame_rate"):
        load_mimi(partial, 8)
    wider = small_mimi_config(card=CARD)
    wider["seanet"]["n_filters"] = 8  # the weights were saved for 4 filters
    mismatched = tmp_path / "mismatched"
    shutil.copytree(mimi_ckpt, mismatched)
    (mismatched / "config.json").write_text(json.dumps(wider | {"weights": "mimi.safetensors"}))
    with pytest.raises(DataError, match="could not load Mimi .*mismatched/mimi.safetensors"):
        load_mimi(mismatched, 8)
    (mismatched / "mimi.safetensors").unlink()
    with pytest.raises(DataError, match="Mimi weights .*mimi.safetensors not found"):
        load_mimi(mismatched, 8)
