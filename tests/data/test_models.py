"""Presets, seeding, the moshi-7b configuration and checkpoint round trips of `fused_stream.data.models`."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

from fused_stream import StreamingEvaluator, batch_losses
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import (
    MOSHI_DELAYS,
    PRESETS,
    count_parameters,
    load_model,
    preset_config,
    save_checkpoint,
)

# Keys that set a preset's size; every other LMModel keyword must equal moshi 7B's, so the small presets run the
# exact code paths of the real model.
SIZE_KEYS = {
    "dim", "num_heads", "num_layers", "hidden_scale", "context", "card", "text_card",
    "depformer_dim", "depformer_num_heads", "depformer_num_layers", "depformer_dim_feedforward",
}


def _tiny(seed: int = 0) -> LMModel:
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=seed)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_result(a, b) -> None:
    for name in ("losses", "text_losses"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), equal_nan=True, rtol=0, atol=0)
    for name in ("valid", "text_valid", "lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def small():
    return load_model("small", device="cpu")


@pytest.fixture(scope="module")
def moshi_7b_meta():
    return LMModel(**preset_config("moshi-7b"), device="meta", dtype=torch.bfloat16)


# --- presets -----------------------------------------------------------------------------------------------------


def test_presets_are_listed():
    assert set(PRESETS) == {"tiny", "small", "moshi-7b"}


def test_tiny_preset(tiny):
    assert isinstance(tiny, LMModel)
    assert 16 <= tiny.context <= 32
    assert tiny.card == 64
    assert tiny.text_card <= 128
    assert tiny.num_codebooks == 17 and tiny.dep_q == 8 and tiny.n_q == 16
    assert list(tiny.delays) == MOSHI_DELAYS
    assert not tiny.training
    params = list(tiny.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert count_parameters(tiny) < 1_000_000


def test_small_preset(small):
    assert small.dim == 256
    assert len(small.transformer.layers) == 4
    assert small.context == 3000
    assert small.card == 2048
    assert small.text_card == 32000
    assert list(small.delays) == MOSHI_DELAYS == loaders._lm_kwargs["delays"]
    assert 30_000_000 <= count_parameters(small) <= 50_000_000
    assert not small.training
    # CPU default dtype is float32 (bf16 matmuls on CPU are slow and inexact).
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in small.parameters())


def test_moshi_delays_match_moshi():
    assert MOSHI_DELAYS == loaders._lm_kwargs["delays"]
    assert len(MOSHI_DELAYS) == 1 + loaders._lm_kwargs["n_q"]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_share_moshi_structure(name):
    config = preset_config(name)
    reference = loaders._lm_kwargs
    assert set(config) == set(reference)
    for key in set(reference) - SIZE_KEYS:
        assert config[key] == reference[key], key


def test_moshi_7b_config_matches_moshi(moshi_7b_meta):
    assert preset_config("moshi-7b") == loaders._lm_kwargs
    model = moshi_7b_meta
    kwargs = loaders._lm_kwargs
    assert model.dim == kwargs["dim"] == 4096
    assert len(model.transformer.layers) == kwargs["num_layers"] == 32
    assert model.context == kwargs["context"] == 3000
    assert model.card == kwargs["card"] and model.text_card == kwargs["text_card"]
    assert model.n_q == kwargs["n_q"] and model.dep_q == kwargs["dep_q"]
    assert list(model.delays) == kwargs["delays"]
    assert len(model.depformer.layers) == kwargs["depformer_num_layers"]
    n = count_parameters(model)
    assert 7.5e9 <= n <= 7.9e9, n
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_moshi_7b_refuses_the_cpu():
    with pytest.raises(ValueError, match="GPU"):
        load_model("moshi-7b", device="cpu")
    with pytest.raises(ValueError, match="GPU"):
        load_model("moshi-7b", device="cpu", dtype=torch.bfloat16)


def test_preset_config_is_a_copy():
    config = preset_config("tiny")
    config["delays"].append(99)
    config["dim"] = 1
    assert preset_config("tiny")["delays"] == MOSHI_DELAYS
    assert preset_config("tiny")["dim"] == 32


def test_unknown_preset_lists_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "huge" cannot be an existing relative path
    with pytest.raises(ValueError, match="huge") as info:
        preset_config("huge")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises((ValueError, FileNotFoundError), match="huge") as info:
        load_model("huge", device="cpu")
    for name in PRESETS:
        assert name in str(info.value)


# --- seeding -----------------------------------------------------------------------------------------------------


def test_same_seed_same_weights(tiny):
    _assert_same_state(tiny, _tiny(seed=0))


def test_different_seed_different_weights(tiny):
    other = _tiny(seed=1).state_dict()
    reference = tiny.state_dict()
    same = [k for k in reference if torch.equal(reference[k], other[k])]
    # Every randomly initialised tensor differs; only the RMS norms' constant-initialised scales may match.
    assert all(k.endswith(".alpha") for k in same), same
    assert len(same) < len(reference) // 4


def test_building_does_not_touch_the_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        expected = torch.rand(8)
        torch.manual_seed(1234)
        _tiny(seed=7)
        after = torch.rand(8)
    assert torch.equal(after, expected)


def test_building_ignores_the_global_rng(tiny):
    with torch.random.fork_rng():
        torch.manual_seed(999)
        other = _tiny(seed=0)
    _assert_same_state(tiny, other)


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture
def codes(tiny):
    return generate_codes(tiny, 2, 40, seed=11)


def test_checkpoint_round_trip(tiny, codes, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    assert (directory / "model.safetensors").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert config["moshi_name"] == "model.safetensors"
    loaded = load_model(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _assert_same_state(tiny, loaded)
    _assert_same_result(StreamingEvaluator(tiny).evaluate(codes), StreamingEvaluator(loaded).evaluate(codes))


def test_checkpoint_from_a_string_path_and_the_weights_file(tiny, codes, tmp_path):
    save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    from_str = load_model(str(tmp_path / "ckpt"), device="cpu", dtype=torch.float32)
    from_file = load_model(tmp_path / "ckpt" / "model.safetensors", device="cpu", dtype=torch.float32)
    _assert_same_state(tiny, from_str)
    _assert_same_state(tiny, from_file)
    _assert_same_result(batch_losses(tiny, codes), batch_losses(from_file, codes))


def test_checkpoint_of_another_seed_is_not_the_preset(tiny, codes, tmp_path):
    other = _tiny(seed=3)
    save_checkpoint(other, tmp_path / "ckpt", preset_config("tiny"))
    loaded = load_model(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    _assert_same_state(other, loaded)
    a, b = batch_losses(tiny, codes), batch_losses(loaded, codes)
    assert not torch.allclose(a.losses.nan_to_num(), b.losses.nan_to_num())


def test_checkpoint_weights_name_from_config(tiny, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    (directory / "model.safetensors").rename(directory / "weights.safetensors")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"moshi_name": "weights.safetensors"}))
    _assert_same_state(tiny, load_model(directory, device="cpu", dtype=torch.float32))


def test_checkpoint_loads_in_another_dtype(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    loaded = load_model(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16)
    state, reference = loaded.state_dict(), tiny.state_dict()
    for key, value in reference.items():
        if value.is_floating_point():
            assert state[key].dtype == torch.bfloat16, key
            assert torch.equal(state[key], value.to(torch.bfloat16)), key


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "no" / "such" / "ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(missing, device="cpu")


def test_config_without_weights_raises_file_not_found(tiny, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(directory / "model.safetensors"))):
        load_model(directory, device="cpu")


def test_corrupt_weights_raise_value_error_naming_the_file(tiny, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    weights = directory / "model.safetensors"
    weights.write_bytes(random.Random(0).randbytes(4096))
    for spec in (directory, weights):
        with pytest.raises(ValueError, match=re.escape(str(weights))):
            load_model(spec, device="cpu", dtype=torch.float32)


def test_a_checkpoint_that_cannot_load_is_a_checkpoint_error_but_a_gpu_fault_is_not(tiny, tmp_path, monkeypatch):
    """A corrupt file is the user's input (CheckpointError: one line, exit 2 in the CLI); a CUDA error while loading
    is the device's, and passes unchanged (the CLI reports it as an internal error)."""
    from fused_stream.data.checkpoints import CheckpointError

    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    (directory / "model.safetensors").write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(CheckpointError, match="could not load the moshi checkpoint"):
        load_model(directory, device="cpu", dtype=torch.float32)
    save_checkpoint(tiny, directory, preset_config("tiny"))
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")

    def device_fails(*args, **kwargs):
        raise fault

    monkeypatch.setattr(loaders, "get_moshi_lm", device_fails)
    with pytest.raises(RuntimeError) as info:
        load_model(directory, device="cpu", dtype=torch.float32)
    assert info.value is fault


def test_config_that_does_not_match_the_weights_raises_value_error(tiny, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny") | {"dim": 48})
    with pytest.raises(ValueError, match=re.escape(str(directory / "model.safetensors"))):
        load_model(directory, device="cpu", dtype=torch.float32)


def test_invalid_config_json_raises_value_error(tiny, tmp_path):
    directory = save_checkpoint(tiny, tmp_path / "ckpt", preset_config("tiny"))
    (directory / "config.json").write_text("{not json,")
    with pytest.raises(ValueError, match="config") as info:
        load_model(directory, device="cpu", dtype=torch.float32)
    assert str(directory / "config.json") in str(info.value)


def test_shape_mismatch_names_the_first_tensors_with_both_shapes(tiny, tmp_path):
    """Before: moshi's multi-line "Error(s) in loading state_dict"; now one line with names and both shapes."""
    directory = save_checkpoint(tiny, tmp_path / "wide", preset_config("tiny") | {"dim": 48})
    with pytest.raises(ValueError) as info:
        load_model(directory, device="cpu", dtype=torch.float32)
    message = str(info.value)
    assert "\n" not in message and str(directory / "model.safetensors") in message
    assert re.search(r": \d+ tensors differ in shape from the model built from its config\.json, first emb\.0\.weight "
                     r"\[65, 32\] in the checkpoint vs \[65, 48\] in the model", message), message
    deeper = save_checkpoint(tiny, tmp_path / "deep", preset_config("tiny") | {"num_layers": 3})
    with pytest.raises(ValueError, match=r"model tensors missing from the checkpoint, first transformer\.layers\.2\."):
        load_model(deeper, device="cpu", dtype=torch.float32)
    shallow = save_checkpoint(tiny, tmp_path / "shallow", preset_config("tiny") | {"num_layers": 1})
    with pytest.raises(ValueError, match=r"checkpoint tensors not in the model, first transformer\.layers\.1\."):
        load_model(shallow, device="cpu", dtype=torch.float32)
