"""`options.finetune_config`: a fused_stream config vs a moshi-finetune training config, and the paper_metrics keys."""

from __future__ import annotations

import types

import pytest
import yaml

from fused_stream.core.config import ConfigError
from fused_stream.options.settings import read_config, read_finetune_config


def _read(config, strict=False):
    return read_finetune_config(config, strict=strict, source="test")


def test_a_training_config_gives_only_its_paper_metrics_block(tmp_path):
    config = {"batch_size": 16, "lora": {"enable": True}, "seq_len": 100,
              "paper_metrics": {"librilight_batch_size": 2, "librilight_audio_dir": "/a"}}
    assert _read(config) == {"batch_size": 2, "audio": "/a"}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert read_config(path) == {"batch_size": 2, "audio": "/a"}
    # an object with attributes, as a training loop holds its args
    assert _read(types.SimpleNamespace(batch_size=16, paper_metrics={"librilight_window": 10})) == {"window": 10}


def test_a_fused_stream_config_gives_options_by_name(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("batch_size: 4\nchunk-size: 8\nlibrilight_max_files: 2\nlibrilight_streaming:\n  verify: false\n")
    assert read_config(path) == {"batch_size": 4, "chunk_size": 8, "max_files": 2, "verify": False}


def test_the_book_modes_and_their_folders():
    block = {"librilight_evaluation_mode": "pre_concatenated", "librilight_concatenated_dir": "/hours",
             "librilight_audio_dir": "/medium", "librilight_max_files": 3}
    assert _read(block) == {"book_mode": "pre_concatenated", "audio": "/hours", "max_files": 3}
    block = {"librilight_evaluation_mode": "single_book", "librilight_speaker_id": 100, "librilight_book_name": "b",
             "librilight_concatenated_dir": "/hours", "librilight_audio_dir": "/medium"}
    assert _read(block) == {"book_mode": "single_book", "speaker": "100", "book": "b", "audio": "/medium"}


def test_weighting_and_verification_keys():
    values = _read({"first_codebook_weight_multiplier": 100.0,
                    "librilight_streaming": {"verify_loss_computation": False, "use_fixed_method": True}})
    assert values == {"first_codebook_weight": 100.0, "verify": False}
    with pytest.raises(ConfigError, match="use_fixed_method: false asks for the legacy"):
        _read({"librilight_streaming": {"use_fixed_method": False}})
    with pytest.raises(ConfigError, match="unknown key 'paper_metrics.librilight_streaming.memory_log_intervall'"):
        _read({"paper_metrics": {"librilight_streaming": {"memory_log_intervall": 3}}})
