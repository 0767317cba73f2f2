"""The CLI with Hugging Face checkpoints from an offline fake hub cache: moshi's flags, `hf:` specs side by side,
the checkpoint's Mimi for --audio, and bad input refused (exit 2, one line) before any model loads. References are
moshi's own loader and the batch path (`LMModel.forward`)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from hub_fixtures import TOKENIZER, add_repo, lora_adapter, offline_hub, tiny_hub_repo
from moshi.models import loaders

from fused_stream.cli.fingerprints import file_fingerprint
from fused_stream.cli.main import main
from fused_stream.data.checkpoints import HubCheckpoint
from fused_stream.data.codes import generate_codes
from fused_stream.data.mimi import MIMI_WEIGHTS, hub_mimi
from fused_stream.data.models import load_model
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

REPO = "kyutai/tiny-moshi"
FILE_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name")
QUIET = ("-q", "--threads", "1")  # one thread: tiny models on a busy CPU (see _one_thread)


def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _outputs(out):
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Built once: the cache with kyutai/tiny-moshi (the `tiny` preset, seed 0), a LoRA run, and a codes folder
    holding one full-layout [17, 36] sequence."""
    root = tmp_path_factory.mktemp("hubroot")
    repo = tiny_hub_repo(root / "hub", root / "build")
    lora = lora_adapter(repo, root / "run")
    codes = generate_codes(load_model("tiny", device="cpu", dtype=torch.float32), 1, [36], seed=11)[0]
    (root / "codes").mkdir()
    torch.save(codes.clone(), root / "codes" / "seq.pt")
    return {"root": root, "repo": repo, "lora": lora, "weights": root / "build" / "model.safetensors",
            "codes": codes, "codes_dir": root / "codes"}


@pytest.fixture
def hub(built, monkeypatch):
    return built | {"cache": offline_hub(monkeypatch, built["root"])}






def _moshi_lora_model(hub):
    """The LoRA model as moshi's own loader builds it from the run's files."""
    lm_kwargs = {k: v for k, v in hub["lora"]["lm"].items() if k not in FILE_KEYS}
    return loaders.get_moshi_lm(hub["weights"], lm_kwargs=lm_kwargs, lora_weights=hub["lora"]["lora"],
                                fuse_lora=True, device="cpu", dtype=torch.float32).eval()


def _csv_columns(path):
    rows = list(csv.reader(path.open()))
    header, body = rows[0], rows[1:]
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def _assert_curves_match(columns, reference, prefix=""):
    """per_position.csv of a one-sequence run against the reference's per-position losses (empty cell = invalid)."""
    losses, valid = reference.losses[0], reference.valid[0]  # [dep_q, T]
    T = losses.shape[1]
    assert len(columns[prefix + "combined"]) == T
    for k in range(losses.shape[0]):
        cells = columns[f"{prefix}codebook_{k}"]
        for t in range(T):
            if valid[k, t]:
                assert float(cells[t]) == pytest.approx(float(losses[k, t]), abs=1e-4), (k, t)
            else:
                assert cells[t] == "", (k, t)
    text, text_valid = reference.text_losses[0, 0], reference.text_valid[0, 0]
    for t in range(T):
        cell = columns[prefix + "text"][t]
        assert (float(cell) == pytest.approx(float(text[t]), abs=1e-4)) if text_valid[t] else cell == ""
        per_codebook = [float(losses[k, t]) for k in range(losses.shape[0]) if valid[k, t]]
        if per_codebook:
            assert float(columns[prefix + "combined"][t]) == pytest.approx(math.fsum(per_codebook) / len(per_codebook),
                                                                           abs=1e-4)


# ---------------------------------------------------------------------------------------------------- running
def test_moshis_flags_with_lora_equal_moshis_lora_model(hub, capsys):
    out = hub["root"] / "out_flags"
    argv = ["--hf-repo", REPO, "--lora-weight", str(hub["lora"]["lora"]), "--config-path", str(hub["lora"]["config"]),
            "--codes", str(hub["codes_dir"]), "--out", str(out), *QUIET]
    assert main(argv) == 0, capsys.readouterr().err
    results = _strict_json(out / "results.json")
    (run,) = results["models"]
    assert run["label"] == "tiny-moshi-lora"
    assert run["report"]["verification"]["passed"]
    assert [d["frames"] for d in results["data"]] == [36]
    reference = batch_losses(_moshi_lora_model(hub), hub["codes"][None])
    _assert_curves_match(_csv_columns(out / "per_position.csv"), reference)
    # The same model spelt as an hf: spec gives the same numbers.
    same = hub["root"] / "out_spec"
    spec = f"ft=hf:{REPO},lora={hub['lora']['lora']},config={hub['lora']['config']}"
    assert main(["--model", spec, "--codes", str(hub["codes_dir"]), "--out", str(same), *QUIET]) == 0
    assert _strict_json(same / "results.json")["models"][0]["metrics"] == run["metrics"]


def test_base_and_lora_side_by_side(hub, capsys):
    out = hub["root"] / "out_pair"
    lora, config = hub["lora"]["lora"], hub["lora"]["config"]
    argv = ["--model", f"base=hf:{REPO}", "--model", f"ft=hf:{REPO},lora={lora},config={config}",
            "--codes", str(hub["codes_dir"]), "--out", str(out), *QUIET, "--chunk-size", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    results = _strict_json(out / "results.json")
    assert [m["label"] for m in results["models"]] == ["base", "ft"]
    base, ft = results["models"]
    assert base["metrics"]["overall"]["combined"] != pytest.approx(ft["metrics"]["overall"]["combined"], abs=1e-3)
    columns = _csv_columns(out / "per_position.csv")
    codes = hub["codes"][None]
    _assert_curves_match(columns, batch_losses(load_model("tiny", device="cpu", dtype=torch.float32), codes), "base:")
    _assert_curves_match(columns, batch_losses(_moshi_lora_model(hub), codes), "ft:")
    # What each result depends on: the LoRA weights' content and the config are in ft's fingerprint, not base's.
    ft_run = _strict_json(out / "partial" / "ft" / "run.json")
    base_run = _strict_json(out / "partial" / "base" / "run.json")
    assert ft_run["lora_weights"] == file_fingerprint(lora) and str(lora) in ft_run["model"]
    assert base_run["lora_weights"] is None and str(lora) not in base_run["model"]
    assert ft_run["model_weights"] == base_run["model_weights"]  # the same base weights file
    assert ft_run["model_config"] != base_run["model_config"]
    assert ft["report"]["checkpoint"]["lora_weights"] == str(lora)


def test_no_fuse_lora_runs(hub):
    out = hub["root"] / "out_unfused"
    argv = ["--hf-repo", REPO, "--lora-weight", str(hub["lora"]["lora"]), "--config-path", str(hub["lora"]["config"]),
            "--no-fuse-lora", "--codes", str(hub["codes_dir"]), "--out", str(out), *QUIET]
    assert main(argv) == 0
    reference = batch_losses(_moshi_lora_model(hub), hub["codes"][None])
    _assert_curves_match(_csv_columns(out / "per_position.csv"), reference)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    from audio_fixtures import speech_like, write_flac

    root = tmp_path_factory.mktemp("audio")
    (root / "100" / "book").mkdir(parents=True)
    write_flac(root / "100" / "book" / "chapter_1.flac", speech_like(2.0, 16000, seed=3), 16000)
    return root


def test_audio_is_tokenized_with_the_checkpoints_mimi(hub, audio_dir, capsys):
    out = hub["root"] / "out_audio"
    assert main(["--hf-repo", REPO, "--audio", str(audio_dir), "--out", str(out), *QUIET]) == 0, capsys.readouterr().err
    results = _strict_json(out / "results.json")
    assert [d["frames"] for d in results["data"]] == [25]  # 2 s at 12.5 Hz
    assert results["models"][0]["report"]["verification"]["passed"]
    digest = hub_mimi(HubCheckpoint.parse(f"hf:{REPO}").resolve()).digest
    assert _strict_json(out / "partial" / "tiny-moshi" / "run.json")["mimi_checkpoint"] == digest
    assert len(list((out / "cache").glob("*.safetensors"))) == 1
    # Independently: the repository's Mimi files given as a local --mimi checkpoint give the same codes and numbers.
    mimi_dir = hub["root"] / "mimi_ckpt"
    mimi_dir.mkdir(exist_ok=True)
    shutil.copyfile(hub["root"] / "build" / MIMI_WEIGHTS, mimi_dir / MIMI_WEIGHTS)
    (mimi_dir / "config.json").write_text(json.dumps(hub["repo"]["mimi_config"] | {"weights": MIMI_WEIGHTS}))
    local = hub["root"] / "out_audio_local"
    assert main(["--hf-repo", REPO, "--mimi", str(mimi_dir), "--audio", str(audio_dir), "--out", str(local),
                 *QUIET]) == 0
    assert _strict_json(local / "partial" / "tiny-moshi" / "run.json")["mimi_checkpoint"] == digest
    assert _strict_json(local / "results.json")["models"][0]["metrics"] == results["models"][0]["metrics"]
    assert [p.name for p in (local / "cache").glob("*.safetensors")] == \
        [p.name for p in (out / "cache").glob("*.safetensors")]  # the cache is keyed by the same Mimi digest


# ------------------------------------------------------------------------------------------------- bad input
def _refused(tmp_path, capsys, argv, *needles):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert _outputs(out) == []
    return err


def test_a_file_missing_from_the_cache_is_named_with_how_to_fetch_it(hub, tmp_path, capsys, no_model_load):
    add_repo(hub["cache"], "kyutai/no-tokenizer", {
        "config.json": json.dumps(hub["repo"]["config"]), "model.safetensors": b"x", MIMI_WEIGHTS: b"x",
        "mimi_config.json": json.dumps(hub["repo"]["mimi_config"]),
    })
    _refused(tmp_path, capsys, ["--hf-repo", "kyutai/no-tokenizer", "--generate", "1"], "kyutai/no-tokenizer",
             TOKENIZER, f"huggingface-cli download kyutai/no-tokenizer {TOKENIZER}")
    _refused(tmp_path, capsys, ["--model", "a=hf:kyutai/not-cached", "--generate", "1"], "kyutai/not-cached",
             "huggingface-cli download kyutai/not-cached")


def test_moshis_flags_and_model_together_are_refused(hub, tmp_path, capsys, no_model_load):
    _refused(tmp_path, capsys, ["--hf-repo", REPO, "--model", "tiny", "--generate", "1"], "--hf-repo", "--model")


def test_lora_weights_with_a_config_without_lora_are_refused(hub, tmp_path, capsys, no_model_load):
    lora = str(hub["lora"]["lora"])
    _refused(tmp_path, capsys, ["--hf-repo", REPO, "--lora-weight", lora, "--generate", "1"], lora, "lora: true",
             "--config-path")
    _refused(tmp_path, capsys, ["--hf-repo", REPO, "--config-path", str(hub["lora"]["config"]), "--generate", "1"],
             "no LoRA weights", "--lora-weight")


def test_audio_with_a_preset_needs_a_mimi(hub, tmp_path, audio_dir, capsys, no_model_load):
    _refused(tmp_path, capsys, ["--model", "tiny", "--audio", str(audio_dir)], "--mimi", str(audio_dir))


def test_the_second_models_bad_checkpoint_is_refused_before_the_first_runs(hub, tmp_path, capsys, no_model_load):
    missing = tmp_path / "no_such_lora.safetensors"
    _refused(tmp_path, capsys, ["--model", f"base=hf:{REPO}", "--model",
                                f"ft=hf:{REPO},lora={missing},config={hub['lora']['config']}", "--generate", "1"],
             "ft=", str(missing))


def test_help_documents_moshis_flags_and_the_hf_form(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--hf-repo", "--moshi-weight", "--mimi-weight", "--tokenizer", "--config-path", "--lora-weight",
                   "--no-fuse-lora", "hf:ORG/NAME"):
        assert option in text, option
