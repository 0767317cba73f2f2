"""Run settings: EvalConfig's defaults < YAML config (incl. the finetune paper_metrics block) < command line;
clear errors, and one reader and one error type for the finetune block, shared with `PaperMetricsLibriLight`."""

from __future__ import annotations

import argparse
import dataclasses
import types

import pytest

from fused_stream import PaperMetricsLibriLight
from fused_stream.cli.main import build_parser
from fused_stream.core.config import ConfigError, EvalConfig
from fused_stream.options.settings import SettingsError, model_label, model_spec, read_config, resolve


def settings_for(argv):
    return resolve(build_parser().parse_args(argv))


def test_defaults_are_the_synthetic_demo():
    s = settings_for([])
    assert s.model == ["tiny"] and s.synthetic and s.generate is None and s.out == "fused_stream_out"
    assert s.eval == EvalConfig() and s.eval.verify is True


def test_config_file_then_cli_wins(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("chunk-size: 8\nwindow: 500\nmodel: small\ncodebook_weights: 100,1,1,1,1,1,1,1\n")
    s = settings_for(["--config", str(config), "--window", "250"])
    assert s.eval.chunk_size == 8 and s.eval.window == 250 and s.model == ["small"]
    assert s.eval.codebook_weights == [100.0] + [1.0] * 7


def test_legacy_paper_metrics_block(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "paper_metrics:\n  librilight_streaming:\n    enabled: true\n    memory_check: true\n"
        "    cache_clear_interval: 3000\n    max_sequence_length: 24000\n    ttt_verification: true\n"
    )
    s = settings_for(["--config", str(config)])
    # memory_check keeps the legacy meaning, a warning when memory grows: never the failing assert_constant_memory
    assert s.eval.max_frames == 24000 and s.memory_check and not s.eval.assert_constant_memory
    assert s.ttt_verification and s.enabled
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
        (["--audio", "dir"], "needs a Mimi"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--dtype", "float8"], "--dtype"),
        (["--model", "tiny", "--model", "tiny"], "share a label"),
    ],
)
def test_bad_options(argv, match):
    with pytest.raises(SettingsError, match=match):
        settings_for(argv)


def test_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--text-fill", "silence"])
    assert exit_info.value.code == 2 and "--text-fill" in capsys.readouterr().err


def test_settings_error_is_config_error():
    assert SettingsError is ConfigError and issubclass(ConfigError, ValueError)


def test_model_labels():
    assert (model_label("baseline=ckpt/a"), model_spec("baseline=ckpt/a")) == ("baseline", "ckpt/a")
    assert model_label("runs/ttt/model.safetensors") == "model" and model_label("tiny") == "tiny"
    # An hf: spec's own "=" is not a label's; without a label it is named after its repository.
    hub = "hf:kyutai/moshiko-pytorch-bf16,lora=run/lora.safetensors,config=run/config.json"
    assert (model_label(hub), model_spec(hub)) == ("moshiko-pytorch-bf16-lora", hub)
    assert (model_label("ft=" + hub), model_spec("ft=" + hub)) == ("ft", hub)
    assert model_label("hf:kyutai/moshiko-pytorch-bf16@abc123") == "moshiko-pytorch-bf16"


# ----------------------------------------------------------------------------------------------------------------
# The evaluation options come from EvalConfig, and the finetune block has one reader
# ----------------------------------------------------------------------------------------------------------------
def test_evaluation_flags_are_eval_configs_cli_fields_with_its_defaults():
    cli_fields = [f for f in dataclasses.fields(EvalConfig) if f.metadata["cli"]]
    actions = {a.dest: a for a in build_parser()._actions}
    for f in cli_fields:
        action = actions[f.name]
        flag = "--" + f.name.replace("_", "-")
        on_by_default = f.default is True  # --verify / --no-verify
        assert action.option_strings == ([flag, "--no-" + flag[2:]] if on_by_default else [flag]), f.name
        assert action.default is None and action.help == f.metadata["help"], f.name
        if f.metadata["choices"] is not None:
            assert list(action.choices) == list(f.metadata["choices"]), f.name
        if isinstance(f.default, bool):
            kind = argparse.BooleanOptionalAction if on_by_default else argparse._StoreTrueAction
            assert isinstance(action, kind), f.name
    hidden = {f.name for f in dataclasses.fields(EvalConfig) if not f.metadata["cli"]}
    # device, dtype and progress are the CLI's own options (model loading, bars), not EvalConfig's
    assert not (hidden - {"device", "dtype", "progress"}) & set(actions)
    assert settings_for([]).eval == EvalConfig()
    s = settings_for(["--batch-size", "3", "--codebook-weights", "1,2", "--loss-backend", "torch",
                      "--assert-constant-memory", "--text-fill", "pad"])
    assert s.eval == EvalConfig(batch_size=3, codebook_weights=[1.0, 2.0], loss_backend="torch",
                                assert_constant_memory=True, text_fill="pad")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--batch-size", "many"])


def test_fingerprint_reads_the_evaluation_options():
    a, b = settings_for([]), settings_for(["--chunk-size", "4", "--max-frames", "9", "--other-fill", "copy"])
    fa, fb = a.fingerprint("tiny"), b.fingerprint("tiny")
    assert (fb["chunk_size"], fb["max_frames"], fb["other_fill"]) == (4, 9, "copy")
    assert {k for k in fa if fa[k] != fb[k]} == {"chunk_size", "max_frames", "other_fill"}
    assert settings_for(["--batch-size", "2"]).fingerprint("tiny") == fa  # the batch size changes no loss
    assert a.as_dict()["chunk_size"] == 1 and a.as_dict()["dtype"] == "auto" and "eval" not in a.as_dict()


def test_fingerprint_holds_this_models_ttt_and_the_invalid_token_policy():
    s = settings_for(["--model", "a=tiny", "--model", "b=tiny", "--ttt", "b:layers=1,mb=4"])
    assert s.fingerprint("a=tiny")["ttt"] == []  # another model's TTT changes none of this one's numbers
    assert s.fingerprint("b=tiny")["ttt"] == [{"layers": [1], "mini_batch": 4}]
    assert s.fingerprint("a=tiny")["model"] == "tiny"
    assert settings_for(["--invalid-tokens", "mask"]).fingerprint("tiny")["invalid_tokens"] == "mask"
    assert settings_for(["--threads", "3"]).fingerprint("tiny") == settings_for([]).fingerprint("tiny")


FINETUNE_BLOCK = {
    "librilight_audio_dir": "/data/librilight", "librilight_max_files": 3, "librilight_concat_chapters": True,
    "librilight_chunk_size": 8, "librilight_batch_size": "auto", "librilight_window": 100, "other_metric": 1,
    "librilight_streaming": {"enabled": True, "memory_check": True, "cache_clear_interval": 10,
                             "max_sequence_length": 500, "ttt_verification": True, "text-fill": "pad"},
}


def test_the_finetune_block_means_the_same_to_config_and_compat(tmp_path):
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"paper_metrics": FINETUNE_BLOCK}))
    s = settings_for(["--config", str(path), "--mimi", "m.safetensors"])
    expected = EvalConfig(chunk_size=8, window=100, max_frames=500, text_fill="pad")
    assert s.eval == expected
    assert (s.audio, s.max_files, s.concat_chapters, s.ttt_verification) == ("/data/librilight", 3, True, True)
    for config in ({"paper_metrics": FINETUNE_BLOCK, "lr": 1e-4, "batch_size": 16},
                   types.SimpleNamespace(paper_metrics=FINETUNE_BLOCK, max_steps=10)):
        compat = PaperMetricsLibriLight(_FakeMimi(), config)
        assert compat.config == expected
        assert (compat.settings.audio, compat.settings.max_files, compat.settings.concat_chapters) == (
            "/data/librilight", 3, True)


@pytest.mark.parametrize(
    "block,match",
    [
        ({"librilight_streaming": {"max_sequence_length": 0}}, "librilight_streaming.max_sequence_length: max_frames"),
        ({"librilight_chunk_size": -2}, "paper_metrics.librilight_chunk_size: chunk_size"),
        ({"librilight_batch_size": "lots"}, "librilight_batch_size: batch_size"),
        ({"librilight_streaming": {"memory_check": "yes"}}, "memory_check: memory_check must be true or false"),
        ({"librilight_streaming": {"cuda_graphs": "sometimes"}}, "cuda_graphs: cuda_graphs must be one of"),
        ({"librilight_streaming": {"enabled": "no"}}, "enabled: enabled must be true or false"),
        ({"librilight_streaming": {"max_sequence_lenght": 10}}, "unknown key 'paper_metrics.librilight_streaming."),
    ],
)
def test_config_and_compat_raise_the_same_config_error(tmp_path, block, match):
    import yaml

    block = {"librilight_audio_dir": "/data", **block}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"paper_metrics": block}))
    with pytest.raises(ConfigError, match=match) as from_file:
        settings_for(["--config", str(path), "--mimi", "m"])
    with pytest.raises(ConfigError, match=match) as from_compat:
        PaperMetricsLibriLight(_FakeMimi(), {"paper_metrics": block})
    # the same message after where it came from ("config file PATH" / "PaperMetricsLibriLight config")
    assert str(from_file.value).split(": ", 1)[1] == str(from_compat.value).split(": ", 1)[1]


def test_config_is_strict_at_its_top_level_and_compat_ignores_other_tools_keys(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("lr: 0.001\nlibrilight_audio_dir: /data\n")
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        read_config(path)
    compat = PaperMetricsLibriLight(_FakeMimi(), {"lr": 1e-3, "librilight_audio_dir": "/data", "chunk_size": 64})
    assert compat.config == EvalConfig()  # a finetune config's top-level chunk_size is not ours
    with pytest.raises(ConfigError, match="out only apply to the command line"):
        PaperMetricsLibriLight(_FakeMimi(), {"librilight_audio_dir": "/data", "librilight_streaming": {"out": "x"}})


def test_the_sub_block_wins():
    config = {"max_sequence_length": 10, "paper_metrics": {"max_sequence_length": 20, "librilight_audio_dir": "/a",
                                                           "librilight_streaming": {"max_sequence_length": 30}}}
    assert PaperMetricsLibriLight(_FakeMimi(), config).config.max_frames == 30
    del config["paper_metrics"]["librilight_streaming"]
    assert PaperMetricsLibriLight(_FakeMimi(), config).config.max_frames == 20


class _FakeMimi(types.SimpleNamespace):
    """Enough of a Mimi to build the compat evaluator (its state is hashed once): reading the config is tested."""

    def state_dict(self):
        return {}
