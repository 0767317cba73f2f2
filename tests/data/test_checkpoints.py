"""Hugging Face checkpoints (`hf:` specs and moshi's flags) from an offline fake hub cache: the weights, LoRA fused
and unfused, the checkpoint's Mimi, and every refusal as one line. References are moshi's own loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_fixtures import (
    TOKENIZER,
    add_repo,
    legacy_hub_repo,
    lora_adapter,
    offline_hub,
    tiny_hub_repo,
)
from moshi.models import loaders
from moshi.modules.lora import LoRALinear
from safetensors.torch import load_file, save_file

from fused_stream import EvalConfig, StreamingEvaluator
from fused_stream.data.checkpoints import CheckpointError, HubCheckpoint
from fused_stream.data.codes import generate_codes
from fused_stream.data.mimi import MIMI_WEIGHTS
from fused_stream.data.models import load_model, load_model_and_mimi
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

REPO = "kyutai/tiny-moshi"
FILE_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fake cache, built once: kyutai/tiny-moshi (the `tiny` preset, seed 0) and a LoRA run on it."""
    root = tmp_path_factory.mktemp("hubroot")
    repo = tiny_hub_repo(root / "hub", root / "build")
    lora = lora_adapter(repo, root / "run")
    return {"root": root, "repo": repo, "lora": lora, "weights": root / "build" / "model.safetensors"}


@pytest.fixture
def hub(built, monkeypatch):
    """The module's cache, offline, for this test (huggingface_hub pointed at it)."""
    cache = offline_hub(monkeypatch, built["root"])
    return built | {"cache": cache}




def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _moshi_reference(hub, fuse_lora=True):
    """The LoRA model exactly as moshi's own loader builds it from the run's files (no fused_stream involved)."""
    lm_kwargs = {k: v for k, v in hub["lora"]["lm"].items() if k not in FILE_KEYS}
    return loaders.get_moshi_lm(hub["weights"], lm_kwargs=lm_kwargs, lora_weights=hub["lora"]["lora"],
                                fuse_lora=fuse_lora, device="cpu", dtype=torch.float32).eval()


def _assert_results_close(result, reference, atol=1e-4):
    assert torch.equal(result.valid, reference.valid) and torch.equal(result.text_valid, reference.text_valid)
    assert result.valid.any() and result.text_valid.any()
    torch.testing.assert_close(result.losses, reference.losses, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(result.text_losses, reference.text_losses, atol=atol, rtol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec", [
    "hf:kyutai/tiny-moshi",
    "hf:kyutai/tiny-moshi@v0.1",
    "hf:kyutai/tiny-moshi@0123456789abcdef0123456789abcdef01234567,lora=run/lora.safetensors,config=run/config.json",
    "hf:org/name,moshi=a.safetensors,mimi=hf://kyutai/other/mimi.safetensors,tokenizer=t.model,config=c.json,"
    "lora=l.safetensors,fuse_lora=false",
])
def test_spec_round_trip(spec):
    checkpoint = HubCheckpoint.parse(spec)
    assert HubCheckpoint.parse(checkpoint.spec()) == checkpoint
    assert HubCheckpoint.parse(checkpoint.spec()).spec() == checkpoint.spec()


def test_spec_fields_revision_and_fuse_lora():
    checkpoint = HubCheckpoint.parse("hf:kyutai/tiny-moshi@v2,config=c.json,lora=l.safetensors,fuse_lora=false")
    assert (checkpoint.repo, checkpoint.revision) == (REPO, "v2")
    assert (checkpoint.config_path, checkpoint.lora_weight, checkpoint.fuse_lora) == ("c.json", "l.safetensors", False)
    assert "@v2" in checkpoint.spec() and "fuse_lora=false" in checkpoint.spec()
    assert checkpoint.label() == "tiny-moshi-lora"
    plain = HubCheckpoint.parse("hf:kyutai/tiny-moshi")
    assert plain.revision is None and plain.fuse_lora is True and plain.label() == "tiny-moshi"
    assert plain.spec() == "hf:kyutai/tiny-moshi"  # fuse_lora=true is the default: not spelt out
    assert HubCheckpoint.parse("hf:kyutai/tiny-moshi,fuse_lora=TRUE") == plain
    # The spec of moshi's flags as keywords is the same checkpoint.
    assert HubCheckpoint(repo=REPO, revision="v2", config_path="c.json", lora_weight="l.safetensors",
                         fuse_lora=False) == checkpoint


@pytest.mark.parametrize("spec,needles", [
    ("hf:kyutai/tiny-moshi,weights=x.safetensors", ["'weights=x.safetensors'", "moshi, mimi, tokenizer"]),
    ("hf:kyutai/tiny-moshi,lora=a,lora=b", ["lora=", "twice"]),
    ("hf:kyutai/tiny-moshi,config=a,fuse_lora=false,fuse_lora=true", ["fuse_lora=", "twice"]),
    ("hf:kyutai/tiny-moshi,lora", ["'lora'", "KEY=VALUE"]),
    ("hf:kyutai/tiny-moshi,lora=", ["'lora='", "KEY=VALUE"]),
    ("hf:kyutai/tiny-moshi,fuse_lora=maybe", ["fuse_lora", "'maybe'"]),
    ("hf:tiny-moshi", ["'tiny-moshi'", "ORG/NAME"]),
    ("hf:kyutai/tiny/moshi", ["'kyutai/tiny/moshi'", "ORG/NAME"]),
    ("hf:/tiny-moshi", ["ORG/NAME"]),
    ("kyutai/tiny-moshi", ["hf:"]),
])
def test_bad_specs_name_the_problem(spec, needles):
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(spec)
    message = _one_line_error(exc_info)
    for needle in needles:
        assert needle in message, message
    assert isinstance(exc_info.value, ValueError)


# ------------------------------------------------------------------------------------------------------ models
def test_hub_model_has_the_presets_weights(hub):
    preset = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    from_spec = load_model("hf:kyutai/tiny-moshi", device="cpu", dtype=torch.float32)
    from_flags = load_model(hf_repo=REPO, device="cpu", dtype=torch.float32)
    assert _states_equal(from_spec, preset) and _states_equal(from_flags, preset)
    assert not from_spec.training and next(from_spec.parameters()).dtype == torch.float32
    other_seed = load_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    assert not _states_equal(from_spec, other_seed)  # the comparison can fail


@pytest.mark.parametrize("fuse_lora", [True, False])
def test_lora_streamed_losses_equal_moshis_lora_model(hub, fuse_lora):
    lora, config = hub["lora"]["lora"], hub["lora"]["config"]
    spec = f"hf:{REPO},lora={lora},config={config}" + ("" if fuse_lora else ",fuse_lora=false")
    model = load_model(spec, device="cpu", dtype=torch.float32)
    reference_model = _moshi_reference(hub, fuse_lora=fuse_lora)
    lora_modules = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert lora_modules == sum(isinstance(m, LoRALinear) for m in reference_model.modules())
    assert (lora_modules > 0) == (not fuse_lora)
    assert _states_equal(model, reference_model)

    codes = generate_codes(model, 2, [30, 19], seed=7)  # past the 16-frame context
    reference = batch_losses(reference_model, codes)
    for chunk_size in (1, 4):
        result = StreamingEvaluator(model, EvalConfig(verify=False, chunk_size=chunk_size)).evaluate(codes)
        _assert_results_close(result, reference)

    base = batch_losses(load_model(f"hf:{REPO}", device="cpu", dtype=torch.float32), codes)
    assert torch.equal(base.valid, reference.valid)
    differ = (base.losses - reference.losses).abs()[reference.valid]
    assert differ.max() > 1e-2  # the adapters change the model


def test_fused_and_unfused_lora_agree(hub):
    lora, config = hub["lora"]["lora"], hub["lora"]["config"]
    fused = load_model(lora_weight=lora, config_path=config, hf_repo=REPO, device="cpu", dtype=torch.float32)
    unfused = load_model(lora_weight=lora, config_path=config, hf_repo=REPO, fuse_lora=False, device="cpu",
                         dtype=torch.float32)
    assert not any(isinstance(m, LoRALinear) for m in fused.modules())
    assert any(isinstance(m, LoRALinear) for m in unfused.modules())
    codes = generate_codes(fused, 1, 30, seed=3)
    _assert_results_close(batch_losses(unfused, codes), batch_losses(fused, codes), atol=1e-4)


def test_model_and_its_checkpoints_mimi(hub):
    model, mimi = load_model_and_mimi(hf_repo=REPO, device="cpu", dtype=torch.float32)
    assert _states_equal(model, load_model("tiny", device="cpu", dtype=torch.float32, seed=0))
    saved = load_file(str(hub["root"] / "build" / MIMI_WEIGHTS))
    state = mimi.state_dict()
    assert saved.keys() <= state.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert mimi.num_codebooks == model.dep_q
    assert mimi.frame_rate == hub["repo"]["mimi_config"]["frame_rate"]
    with pytest.raises(ValueError, match="Mimi"):
        load_model_and_mimi("tiny", device="cpu")


# ------------------------------------------------------------------------------------------------------ errors
def test_repo_not_in_the_cache_names_repo_file_and_command(hub):
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse("hf:kyutai/not-cached").resolve()
    message = _one_line_error(exc_info)
    assert "kyutai/not-cached" in message and "`huggingface-cli download kyutai/not-cached " in message
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ValueError) as exc_info:  # load_model says the same
        load_model(hf_repo="kyutai/not-cached", device="cpu")
    assert "huggingface-cli download kyutai/not-cached" in _one_line_error(exc_info)


def test_an_uncached_repo_asks_for_its_config_first(hub):
    """Without config.json the file names moshi would fetch next are only its legacy 7B guesses: the file to fetch
    first is config.json (it names the others). Here the weights are cached, the config is not."""
    add_repo(hub["cache"], "kyutai/only-weights", {"model.safetensors": b"x"})
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse("hf:kyutai/only-weights").resolve()
    message = _one_line_error(exc_info)
    assert "huggingface-cli download kyutai/only-weights config.json" in message
    assert loaders.MIMI_NAME not in message


def test_a_file_missing_from_a_cached_repo_is_named(hub):
    config = hub["repo"]["config"]
    add_repo(hub["cache"], "kyutai/no-tokenizer", {
        "config.json": json.dumps(config), "model.safetensors": b"x", MIMI_WEIGHTS: b"x",
        "mimi_config.json": json.dumps(hub["repo"]["mimi_config"]),
    })
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse("hf:kyutai/no-tokenizer").resolve()
    message = _one_line_error(exc_info)
    assert f"`huggingface-cli download kyutai/no-tokenizer {TOKENIZER}`" in message
    assert message.startswith(f"kyutai/no-tokenizer: {TOKENIZER} is not in the Hugging Face cache")
    # A local tokenizer (moshi's --tokenizer) stands in for the missing file.
    local = hub["root"] / "tokenizer.model"
    local.write_bytes(b"tokenizer")
    resolved = HubCheckpoint.parse(f"hf:kyutai/no-tokenizer,tokenizer={local}").resolve()
    assert Path(resolved.info.tokenizer) == local


def test_a_missing_revision_names_it(hub):
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(f"hf:{REPO}@v9").resolve()
    message = _one_line_error(exc_info)
    assert REPO in message and "--revision v9" in message


def test_legacy_repo_without_the_no_exist_record_is_refused(hub):
    legacy_hub_repo(hub["cache"], "kyutai/legacy-unknown", recorded=False)
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse("hf:kyutai/legacy-unknown").resolve()
    message = _one_line_error(exc_info)
    assert "config.json is not in the Hugging Face cache" in message
    assert "huggingface-cli download kyutai/legacy-unknown config.json" in message


def test_legacy_repo_with_the_no_exist_record_is_moshi_7b(hub):
    legacy_hub_repo(hub["cache"], "kyutai/legacy-7b", recorded=True)
    with pytest.warns(UserWarning, match="no config.json"):  # moshi's own warning: consumed, not passed on
        from moshi.models.loaders import CheckpointInfo

        CheckpointInfo.from_hf_repo("kyutai/legacy-7b")
    resolved = HubCheckpoint.parse("hf:kyutai/legacy-7b").resolve()
    assert resolved.lm_config == loaders._lm_kwargs
    assert resolved.info.moshi_weights.name == loaders.MOSHI_NAME
    assert resolved.info.mimi_weights.name == loaders.MIMI_NAME
    assert resolved.info.tokenizer.name == loaders.TEXT_TOKENIZER_NAME
    assert resolved.config_digest() is None


def test_lora_config_without_lora_weights_is_refused(hub):
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(f"hf:{REPO},config={hub['lora']['config']}").resolve()
    message = _one_line_error(exc_info)
    assert "lora: true" in message and "no LoRA weights" in message and "--lora-weight" in message


def test_lora_weights_with_a_config_without_lora_are_refused(hub):
    lora = hub["lora"]["lora"]
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(f"hf:{REPO},lora={lora}").resolve()
    message = _one_line_error(exc_info)
    assert str(lora) in message and "no lora: true" in message and "--config-path" in message
    with pytest.raises(ValueError) as exc_info:  # the same through load_model's keywords
        load_model(hf_repo=REPO, lora_weight=lora, device="cpu")
    assert "no lora: true" in _one_line_error(exc_info)


def test_a_lora_path_that_does_not_exist_is_named(hub, tmp_path):
    missing = tmp_path / "nowhere" / "lora.safetensors"
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(f"hf:{REPO},lora={missing},config={hub['lora']['config']}").resolve()
    message = _one_line_error(exc_info)
    assert str(missing) in message and "--lora-weight" in message and "not a file" in message


@pytest.mark.parametrize("damage", ["unexpected_key", "wrong_rank", "missing_adapter"])
def test_lora_weights_that_do_not_fit_raise_one_line(hub, tmp_path, damage):
    adapters = load_file(str(hub["lora"]["lora"]))
    if damage == "unexpected_key":
        first = next(iter(adapters))
        adapters["not_a_module." + first] = adapters.pop(first)
        needle = "not_a_module." + first
    elif damage == "missing_adapter":  # moshi loads adapters with strict=False: a missing one is named by us
        dropped = sorted(adapters)[0]
        del adapters[dropped]
        needle = f"1 of the {len(adapters) + 1} LoRA adapter tensors the model needs are missing"
    else:  # rank 8 adapters for a config that says rank 4
        adapters = {k: torch.cat([v, v], 0 if ".lora_A." in k else 1) for k, v in adapters.items()}
        needle = "size mismatch"
    bad = tmp_path / "bad_lora.safetensors"
    save_file(adapters, str(bad))
    with pytest.raises(ValueError) as exc_info:
        load_model(f"hf:{REPO},lora={bad},config={hub['lora']['config']}", device="cpu", dtype=torch.float32)
    message = _one_line_error(exc_info)
    assert needle in message and str(bad) in message
    if damage == "missing_adapter":
        assert dropped in message


# ------------------------------------------------------------------------------------------------ no network, online
@pytest.fixture
def no_network(hub, monkeypatch):
    """The fake cache, but HF_HUB_OFFLINE unset and the hub unreachable (every connection refused at once); moshi's
    resolution must not be reached (online without network it retries every file for about a minute)."""
    import huggingface_hub.constants

    from fused_stream.data import checkpoints

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in checkpoints.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("the hub library was asked although the hub is unreachable")

    monkeypatch.setattr(checkpoints.socket, "create_connection", refuse)
    monkeypatch.setattr(checkpoints.loaders.CheckpointInfo, "from_hf_repo", never)
    return attempts


def test_no_network_without_offline_mode_stops_at_once_and_says_how(no_network):
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse(f"hf:{REPO}").resolve()
    message = _one_line_error(exc_info)
    assert "cannot be reached" in message and "Network is unreachable" in message
    assert "the cache holds this repository: set HF_HUB_OFFLINE=1" in message
    assert no_network == [(("huggingface.co", 443), 3.0)]  # one probe, bounded by HUB_PROBE_SECONDS
    with pytest.raises(CheckpointError) as exc_info:
        HubCheckpoint.parse("hf:kyutai/not-cached").resolve()
    message = _one_line_error(exc_info)
    assert "does not hold this repository" in message and "huggingface-cli download kyutai/not-cached" in message
    assert "HF_HUB_OFFLINE=1" not in message


def test_a_reachable_hub_or_a_proxy_goes_on_to_moshis_resolution(no_network, monkeypatch):
    from fused_stream.data import checkpoints

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(checkpoints.socket, "create_connection", lambda address, timeout=None: Connection())
    with pytest.raises(CheckpointError, match="the hub library was asked"):  # past the probe, into moshi's call
        HubCheckpoint.parse(f"hf:{REPO}").resolve()
    monkeypatch.setattr(checkpoints.socket, "create_connection", lambda address, timeout=None: 1 / 0)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # not probed: a direct connection proves nothing
    with pytest.raises(CheckpointError, match="the hub library was asked"):
        HubCheckpoint.parse(f"hf:{REPO}").resolve()
