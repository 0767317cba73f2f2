"""cli/checks.py: every input checked before the first model loads: one line, exit 2, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fused_stream.cli.checks import check_run, writable_folder
from fused_stream.cli.distributed import World
from fused_stream.cli.main import build_parser, main
from fused_stream.core.config import ConfigError
from fused_stream.data.models import load_model, preset_config, save_checkpoint
from fused_stream.options.settings import resolve


def _refused(tmp_path, capsys, argv, *needles, out=None):
    out = tmp_path / "out" if out is None else out
    assert main([*argv, "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() or out.is_file() or not any(out.iterdir())
    return err


def _settings(argv):
    return resolve(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset as a moshi checkpoint directory (model.safetensors + config.json): 2 temporal layers."""
    model = load_model("tiny", device="cpu", seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny_ckpt", preset_config("tiny"))


# ------------------------------------------------------------------------------------------------ --ttt, weights
@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--ttt", "tiny:layers=2,3"], ["layer 2 does not exist", "2 temporal layers"]),
        (["--ttt", "tiny:layers=-3"], ["layer -3 does not exist"]),
        (["--ttt", "tiny:layers=1,-1"], ["layer -1", "already gets a TTT layer"]),
        (["--ttt", "tiny:layers=0", "--ttt", "tiny:layers=0,mb=4"], ["already gets a TTT layer", "tiny:layers=0"]),
        (["--ttt", "tiny:layers=1,mb=0"], ["mb must be >= 1"]),
        (["--ttt", "tiny:layers=1,lr=nan"], ["lr must be a finite number"]),
        (["--codebook-weights", "1,2"], ["--codebook-weights", "8 audio codebooks"]),
        (["--codebook-weights", "1,1,1,1,1,1,1,inf"], ["finite"]),
    ],
)
def test_ttt_layers_and_codebook_weights_are_checked_before_any_model(tmp_path, capsys, no_model_load, argv,
                                                                       needles):
    _refused(tmp_path, capsys, argv, *needles)


def test_the_second_models_bad_ttt_fails_before_the_first_model_runs(tmp_path, capsys, no_model_load):
    _refused(tmp_path, capsys, ["--model", "a=tiny", "--model", "b=tiny", "--ttt", "b:layers=5"],
             "--ttt 'b:layers=5'", "layer 5")
    _refused(tmp_path, capsys, ["--model", "a=tiny", "--model", "b=no/such/ckpt"], "no/such/ckpt")


def test_a_checkpoints_layer_count_comes_from_its_config(tmp_path, capsys, checkpoint, no_model_load):
    _refused(tmp_path, capsys, ["--model", f"ck={checkpoint}", "--ttt", "ck:layers=2"], "layer 2 does not exist",
             "2 temporal layers")
    (checkpoint.parent / "no_weights").mkdir()
    (checkpoint.parent / "no_weights" / "config.json").write_text((checkpoint / "config.json").read_text())
    _refused(tmp_path, capsys, ["--model", str(checkpoint.parent / "no_weights")], "not found")


def test_devices_and_backends_that_cannot_run_are_refused_first(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    if not torch.cuda.is_available():
        _refused(tmp_path, capsys, ["--device", "cuda"], "CUDA is not available")
        _refused(tmp_path, capsys, ["--cuda-graphs", "on", "--device", "cpu"], "cuda_graphs='on'")
    _refused(tmp_path, capsys, ["--device", "nonsense"], "--device 'nonsense' is not a device")
    _refused(tmp_path, capsys, ["--model", "moshi-7b", "--device", "cpu"], "moshi-7b", "GPU")


def test_a_model_whose_weights_do_not_fit_the_free_memory_is_refused_first(tmp_path, capsys, monkeypatch,
                                                                             checkpoint, no_model_load):
    """The parameter count comes from the config (built on the meta device), times the dtype's size: a 7B in
    float32 on a 24 GB machine stops here, not minutes into loading."""
    import fused_stream.cli.checks as checks_module

    parameters = sum(p.numel() for p in load_model("tiny", device="cpu").parameters())
    argv = ["--model", f"ckpt={checkpoint}", "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(checks_module, "available_bytes", lambda device: (parameters * 4 - 1, "meminfo"))
    err = _refused(tmp_path, capsys, argv, "--model ckpt=", f"{parameters / 1e9:.2f}B parameters", "float32",
                   "(meminfo)", "--dtype bfloat16")
    assert f"{parameters * 4 / 2**30:.1f} GiB in float32" in err
    # One byte more and the same model passes the check; in bfloat16 half the bytes do.
    monkeypatch.setattr(checks_module, "available_bytes", lambda device: (parameters * 4, "meminfo"))
    assert check_run(_settings([*argv, "--out", str(tmp_path / "a")]), World()).models["ckpt"].parameters == parameters
    monkeypatch.setattr(checks_module, "available_bytes", lambda device: (parameters * 2, "meminfo"))
    check_run(_settings([*argv[:-1], "bfloat16", "--out", str(tmp_path / "b")]), World())


# ---------------------------------------------------------------------------------------------------- --out
def test_out_that_is_a_file_fails_before_any_model(tmp_path, capsys, no_model_load):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    _refused(tmp_path, capsys, [], "is an existing file", out=target)
    _refused(tmp_path, capsys, [], "results.txt is a file", out=target / "sub")
    assert target.read_text() == "keep me"


def test_out_that_is_not_writable_or_read_only_fails_before_any_model(tmp_path, capsys, no_model_load, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    def access(path, mode, **kwargs):  # as a non-root user sees a chmod 555 folder (root writes anywhere)
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    _refused(tmp_path, capsys, [], "is not writable", out=locked)
    _refused(tmp_path, capsys, [], "cannot be created", "locked is not writable", out=locked / "new" / "deeper")
    assert list(locked.iterdir()) == []

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", real_access)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly() if Path(path) == locked else real_statvfs(path))
    _refused(tmp_path, capsys, [], "read-only file system", out=locked)


def test_writable_folder_accepts_what_can_be_made(tmp_path):
    writable_folder(tmp_path, "--out")
    writable_folder(tmp_path / "a" / "b", "--out")
    assert not (tmp_path / "a").exists()  # checked, not created
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        writable_folder(tmp_path / "dangling", "--out")


# ------------------------------------------------------------------------------------------------ fingerprint
def test_the_fingerprint_holds_resolved_values_and_file_content(tmp_path, checkpoint):
    world = World()
    auto = check_run(_settings(["--out", str(tmp_path)]), world)
    explicit = check_run(_settings(["--out", str(tmp_path), "--dtype", "float32", "--loss-backend", "torch"]), world)
    fa, fe = auto.fingerprint("tiny"), explicit.fingerprint("tiny")
    assert (fa["dtype"], fa["loss_backend"], fa["device_type"]) == ("float32", "torch", "cpu")
    assert fa == fe  # "auto" resolved on this machine: the same numbers, the same fingerprint
    assert fa["model_weights"] == {"preset": "tiny", "seed": 0}
    assert check_run(_settings(["--out", str(tmp_path), "--dtype", "bfloat16"]), world).fingerprint("tiny") != fa
    masked = check_run(_settings(["--out", str(tmp_path), "--invalid-tokens", "mask"]), world).fingerprint("tiny")
    assert masked["invalid_tokens"] == "mask" and masked != fa
    ck = check_run(_settings(["--out", str(tmp_path), "--model", f"ck={checkpoint}"]), world)
    weights = ck.fingerprint("ck")["model_weights"]
    assert weights["size"] == (checkpoint / "model.safetensors").stat().st_size and len(weights["sha256_sampled"]) == 64
    assert ck.models["ck"].num_layers == 2 and ck.models["ck"].dep_q == 8
