"""`PaperMetricsLibriLight`: a finetune loop's LibriLight evaluator giving the CLI's `--audio` numbers."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from audio_fixtures import speech_like, write_flac

from fused_stream import PaperMetricsLibriLight
from fused_stream.cli.main import main
from fused_stream.compat import mimi_state_hash
from fused_stream.core.config import ConfigError
from fused_stream.data.mimi import random_mimi, small_mimi_config
from fused_stream.verify.parity import ParityError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

CARD = 64  # the tiny preset's audio card
TOL = 1e-9
# A LibriLight-like tree: speaker/book/chapter.flac. Book "100/book_a" concatenated is 40 + 45 s = 500 + 563 =
# 1063 frames: enough for librilight_loss_1k with 100-frame windows ([950, 1050)).
CHAPTERS = [("100/book_a/chapter_2.flac", 45.0, 16000), ("100/book_a/chapter_1.flac", 40.0, 16000),
            ("200/book_b/chapter_1.flac", 15.0, 24000)]




@pytest.fixture(scope="module")
def librilight(tmp_path_factory):
    root = tmp_path_factory.mktemp("librilight")
    for i, (rel, seconds, rate) in enumerate(CHAPTERS):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_flac(root / rel, speech_like(seconds, rate, seed=i), rate)
    return root


def cli_flat(tmp_path, librilight, mimi_ckpt, *options: str) -> dict:
    out = tmp_path / "cli"
    argv = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--audio", str(librilight),
            "--mimi", str(mimi_ckpt), "--out", str(out), "-q", *options]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())["models"][0]["metrics"]["flat"]


def assert_same_flat(ours: dict, cli: dict) -> None:
    # The `_stderr` companions depend on the units: the drop-in resamples its sequences, the CLI books by default
    # (two files of one book are one unit there, two here), so only the numbers themselves must agree.
    ours = {k: v for k, v in ours.items() if not k.endswith("_stderr")}
    cli = {k: v for k, v in cli.items() if not k.endswith("_stderr")}
    assert set(ours) == set(cli), sorted(set(ours) ^ set(cli))
    for key, value in cli.items():
        assert type(ours[key]) is type(value) or isinstance(value, float), key
        assert math.isfinite(ours[key]) and abs(ours[key] - value) <= TOL, (key, ours[key], value)


def test_concatenated_books_match_the_cli(tiny_model, mimi_setup, librilight, tmp_path, encode_calls):
    mimi, ckpt = mimi_setup
    cli = cli_flat(tmp_path, librilight, ckpt, "--concat-chapters", "--chunk-size", "16", "--window", "100")
    assert "librilight_loss_1k" in cli and cli["librilight_samples"] == 2

    config = {"librilight_audio_dir": str(librilight), "librilight_concat_chapters": True,
              "librilight_chunk_size": 16, "librilight_window": 100, "unrelated_finetune_key": 3}
    evaluator = PaperMetricsLibriLight(mimi, config)
    encode_calls.clear()
    first = evaluator.evaluate_librilight_long_context(tiny_model)
    assert len(encode_calls) > 0
    assert_same_flat(first, cli)
    assert all(key.startswith("librilight_") for key in first)

    encode_calls.clear()
    again = evaluator.evaluate_librilight_long_context(tiny_model)  # a later evaluation step of the same run
    assert encode_calls == []  # memoized in the instance: no re-encoding
    assert again == first


@pytest.mark.parametrize("style", ["dict", "object", "nested dict", "nested object"])
def test_config_styles_and_legacy_block_match_the_cli(style, tiny_model, mimi_setup, librilight, tmp_path):
    """Per file (no concatenation), the first 2 files, cropped by the legacy block's max_sequence_length."""
    mimi, ckpt = mimi_setup
    cli = cli_flat(tmp_path, librilight, ckpt, "--max-files", "2", "--max-frames", "530", "--chunk-size", "8",
                   "--window", "100")
    assert cli["librilight_samples"] == 2 and "librilight_loss_1k" not in cli
    keys = {"librilight_audio_dir": librilight, "librilight_max_files": 2, "librilight_chunk_size": 8,
            "librilight_batch_size": "auto", "librilight_window": 100,
            "librilight_streaming": {"max_sequence_length": 530, "enabled": True, "memory_check": False}}
    namespace = types.SimpleNamespace
    config = {
        "dict": keys,
        "object": namespace(**keys),
        "nested dict": {"paper_metrics": keys, "lr": 1e-4},
        "nested object": namespace(paper_metrics=namespace(**keys | {"librilight_streaming": namespace(
            max_sequence_length=530, enabled=True)}), lr=1e-4),
    }[style]
    # cache_dir: the disk cache path, besides the CLI's (whole files encoded, then cropped; here too)
    ours = PaperMetricsLibriLight(mimi, config, cache_dir=tmp_path / "cache").evaluate_librilight_long_context(
        tiny_model)
    assert_same_flat(ours, cli)


def test_crop_without_cache_stops_encoding_early_and_matches(tiny_model, mimi_setup, librilight, tmp_path,
                                                               encode_calls):
    """Without a cache only the frames kept are encoded (Mimi is causal): still the CLI's numbers."""
    mimi, ckpt = mimi_setup
    cli = cli_flat(tmp_path, librilight, ckpt, "--concat-chapters", "--max-frames", "120", "--chunk-size", "8",
                   "--window", "50")
    config = {"librilight_audio_dir": librilight, "librilight_concat_chapters": True, "max_sequence_length": 120,
              "librilight_chunk_size": 8, "librilight_window": 50}
    encode_calls.clear()
    ours = PaperMetricsLibriLight(mimi, config).evaluate_librilight_long_context(tiny_model)
    assert_same_flat(ours, cli)
    assert "librilight_loss_1k" not in ours
    # 120 frames of book_a's first chapter (3 chunks of 50) and of book_b: chapter_2 of book_a is never read.
    assert len(encode_calls) == 3 + 3


def test_disabled_returns_nothing(tiny_model, mimi_setup, encode_calls):
    mimi, _ = mimi_setup
    for config in ({"librilight_streaming": {"enabled": False}},
                   types.SimpleNamespace(paper_metrics={"librilight_streaming": {"enabled": False},
                                                        "librilight_audio_dir": "/nowhere"}),
                   {"paper_metrics": {"enabled": False}}):
        assert PaperMetricsLibriLight(mimi, config).evaluate_librilight_long_context(tiny_model) == {}
    assert encode_calls == []


def test_config_errors_name_the_key(mimi_setup):
    mimi, _ = mimi_setup
    for config in ({}, types.SimpleNamespace(lr=1.0), {"paper_metrics": {"librilight_audio_dir": None}}):
        with pytest.raises(ConfigError, match="librilight_audio_dir"):
            PaperMetricsLibriLight(mimi, config)
    with pytest.raises(ConfigError, match="librilight_max_files"):
        PaperMetricsLibriLight(mimi, {"librilight_audio_dir": "x", "librilight_max_files": 0})
    with pytest.raises(ConfigError, match="max_sequence_length"):
        PaperMetricsLibriLight(mimi, {"librilight_audio_dir": "x", "librilight_streaming": {"max_sequence_length": -1}})
    with pytest.raises(ConfigError, match="enabled"):
        PaperMetricsLibriLight(mimi, {"librilight_audio_dir": "x", "librilight_streaming": {"enabled": "yes"}})


def test_mimi_must_fit_the_model(tiny_model, librilight):
    for card, n_q in ((32, 8), (CARD, 4)):
        mimi = random_mimi(small_mimi_config(card=card, n_q=n_q), seed=0)
        evaluator = PaperMetricsLibriLight(mimi, {"librilight_audio_dir": librilight})
        with pytest.raises(ValueError, match=f"Mimi has {n_q} codebooks of card {card}; the model expects dep_q=8"):
            evaluator.evaluate_librilight_long_context(tiny_model)


def test_mimi_hash_is_stable_and_tracks_the_weights(mimi_setup):
    mimi, _ = mimi_setup
    assert mimi_state_hash(mimi) == mimi_state_hash(mimi) == PaperMetricsLibriLight(
        mimi, {"librilight_audio_dir": "x"}).mimi_hash
    other = random_mimi(small_mimi_config(card=CARD), seed=1)
    assert mimi_state_hash(other) != mimi_state_hash(mimi)


def _forward_only_tiny():
    """A tiny model whose layer 1 updates its state in `forward` only (tests/toy_layers.py)."""
    import importlib.util
    from pathlib import Path

    from fused_stream.data.models import load_model

    spec = importlib.util.spec_from_file_location("compat_toy_layers",
                                                  Path(__file__).parent / "toy_layers.py")
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    model.transformer.layers[1] = toys.ForwardOnlyTTT(model.transformer.layers[1])
    return model


def test_verification_is_on_by_default_and_a_finetune_config_turns_it_off(mimi_setup, librilight):
    mimi, _ = mimi_setup
    base = {"librilight_audio_dir": str(librilight), "librilight_max_files": 1, "max_sequence_length": 60,
            "librilight_chunk_size": 4}
    model = _forward_only_tiny()
    assert PaperMetricsLibriLight(mimi, base).config.verify is True
    with pytest.raises(ParityError, match="sequence 0"):
        PaperMetricsLibriLight(mimi, base).evaluate_librilight_long_context(model)
    off = PaperMetricsLibriLight(mimi, base | {"librilight_streaming": {"verify": False}})
    assert off.config.verify is False
    assert off.evaluate_librilight_long_context(model)["librilight_samples"] == 1
    exact = PaperMetricsLibriLight(mimi, {"paper_metrics": base | {"librilight_streaming": {"verify_frames": 30}}})
    assert exact.config.verify and exact.config.verify_frames == 30
    for bad in ({"verify": "no"}, {"verify_frames": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PaperMetricsLibriLight(mimi, base | {"librilight_streaming": bad})
