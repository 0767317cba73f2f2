"""Run settings: defaults < YAML config (incl. the legacy paper_metrics block) < command line; clear errors."""

from __future__ import annotations

import pytest

from fused_stream.cli.main import build_parser
from fused_stream.cli.settings import SettingsError, model_label, model_spec, read_config, resolve


def settings_for(argv):
    return resolve(build_parser().parse_args(argv))


def test_defaults_are_the_synthetic_demo():
    s = settings_for([])
    assert s.model == ["tiny"] and s.synthetic and s.generate is None and s.out == "fused_stream_out"
    assert s.chunk_size == 1 and s.batch_size == "auto" and s.window == 1000 and s.verify is None


def test_config_file_then_cli_wins(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("chunk-size: 8\nwindow: 500\nmodel: small\ncodebook_weights: 100,1,1,1,1,1,1,1\n")
    s = settings_for(["--config", str(config), "--window", "250"])
    assert s.chunk_size == 8 and s.window == 250 and s.model == ["small"]
    assert s.codebook_weights == [100.0] + [1.0] * 7


def test_legacy_paper_metrics_block(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "paper_metrics:\n  librilight_streaming:\n    enabled: true\n    memory_check: true\n"
        "    cache_clear_interval: 3000\n    max_sequence_length: 24000\n    ttt_verification: true\n"
    )
    s = settings_for(["--config", str(config)])
    assert s.max_frames == 24000 and s.assert_constant_memory and s.ttt_verification and s.enabled
    disabled = tmp_path / "off.yaml"
    disabled.write_text("paper_metrics:\n  librilight_streaming:\n    enabled: false\n")
    assert not settings_for(["--config", str(disabled)]).enabled


@pytest.mark.parametrize(
    "text,match",
    [("chunk_sise: 4\n", "unknown key 'chunk_sise'"), ("- 1\n- 2\n", "mapping"), ("a: [\n", "cannot read")],
)
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=match):
        read_config(path)
    with pytest.raises(SettingsError, match="not found"):
        read_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--codes", "a", "--audio", "b", "--mimi", "m"], "one data source"),
        (["--audio", "dir"], "needs --mimi"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--text-fill", "silence"], "--text-fill"),
        (["--model", "tiny", "--model", "tiny"], "share a label"),
    ],
)
def test_bad_options(argv, match):
    with pytest.raises(SettingsError, match=match):
        settings_for(argv)


def test_model_labels():
    assert (model_label("baseline=ckpt/a"), model_spec("baseline=ckpt/a")) == ("baseline", "ckpt/a")
    assert model_label("runs/ttt/model.safetensors") == "model" and model_label("tiny") == "tiny"
