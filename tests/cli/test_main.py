"""`python -m fused_stream.eval` end to end on `tiny`: outputs, comparisons, config, parity, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from fused_stream.cli.main import main


def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _outputs(out):
    return sorted(p.name for p in out.iterdir() if p.is_file()) if out.exists() else []


def test_default_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "synthetic demo" in stdout and "--audio" in stdout and "tiny" in stdout
    assert "librilight_loss" not in stdout  # 200 frames reach no 8k/16k/24k window: no empty rows
    assert [row.split()[-1] for row in stdout.splitlines() if row.startswith("frames (total)")] == ["800"]
    results = _strict_json(out / "results.json")
    for key in ("config", "environment", "data", "models", "seed"):
        assert key in results
    (run,) = results["models"]
    assert run["label"] == "tiny" and run["parameters"] > 0
    assert run["report"]["verification"]["passed"] and run["report"]["verification"]["masks_identical"]
    assert run["metrics"]["flat"]["librilight_samples"] == 4
    assert "librilight_loss_8k" not in run["metrics"]["flat"]  # 200 frames: never a fake value
    assert [d["frames"] for d in results["data"]] == [200] * 4
    rows = list(csv.reader((out / "per_position.csv").open()))
    assert len(rows) == 1 + 200 and rows[0][0] == "position"
    image = pytest.importorskip("matplotlib.image").imread(out / "loss_curve.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_two_models_share_data_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", "base=tiny", "--model", "other=tiny", "--generate", "2", "--frames", "40", "--out", str(out)]
    assert main(argv + ["--chunk-size", "4", "--no-verify"]) == 0
    stdout = capsys.readouterr().out
    assert "base" in stdout and "other" in stdout
    results = _strict_json(out / "results.json")
    assert [m["label"] for m in results["models"]] == ["base", "other"]
    # Same preset, same seed, same data: identical numbers, computed twice.
    a, b = (m["metrics"]["overall"]["combined"] for m in results["models"])
    assert a == pytest.approx(b, abs=1e-6)
    header = next(csv.reader((out / "per_position.csv").open()))
    assert "base:combined" in header and "other:combined" in header


def test_legacy_config_block_and_cli_override(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "paper_metrics:\n  librilight_streaming:\n    enabled: true\n    memory_check: false\n"
        "    cache_clear_interval: 1000\n    max_sequence_length: 30\n    ttt_verification: false\n"
        "generate: 2\nframes: 50\n"
    )
    out = tmp_path / "out"
    assert main(["--config", str(config), "--frames", "60", "--out", str(out), "-q"]) == 0
    results = _strict_json(out / "results.json")
    assert [d["frames"] for d in results["data"]] == [30, 30]  # max_sequence_length crops the CLI's 60 frames
    assert results["config"]["frames"] == 60


def test_config_can_disable_the_run(tmp_path, capsys):
    config = tmp_path / "off.yaml"
    config.write_text("paper_metrics:\n  librilight_streaming:\n    enabled: false\n")
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    assert "disabled" in capsys.readouterr().out and not out.exists()


def test_codes_directory_end_to_end(tmp_path, tiny_model, make_codes):
    codes_dir = tmp_path / "codes"
    codes_dir.mkdir()
    for i, T in enumerate([45, 30]):
        full = make_codes(tiny_model, [T], seed=i)[0]
        torch.save(full[1 : 1 + tiny_model.dep_q].clone(), codes_dir / f"file_{i}.pt")  # [8, T] audio codes
    out = tmp_path / "out"
    assert main(["--codes", str(codes_dir), "--out", str(out), "--verify", "-q"]) == 0
    results = _strict_json(out / "results.json")
    assert sorted(d["frames"] for d in results["data"]) == [30, 45]
    assert results["models"][0]["report"]["verification"]["passed"]
    assert results["models"][0]["metrics"].get("overall", {}).get("text") is None  # text filled with zero tokens


class _ForwardOnlyState(torch.nn.Module):
    """A hand-written TTT-like layer: its state (a running sum of its outputs) is carried along time inside one
    call only, so a whole-sequence forward sees it and a stream, one call per step, never does."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        return y + torch.cumsum(y, dim=1) - y


def test_a_model_that_streams_unlike_its_forward_exits_1_and_reports_nothing(tmp_path, monkeypatch, capsys,
                                                                             tiny_model, make_codes):
    import fused_stream.cli.run as run_module

    real = run_module.open_model

    def with_forward_only_state(*args, **kwargs):
        model = real(*args, **kwargs)
        model.transformer.layers[1] = _ForwardOnlyState(model.transformer.layers[1])
        return model

    monkeypatch.setattr(run_module, "open_model", with_forward_only_state)
    codes_dir = tmp_path / "codes"
    codes_dir.mkdir()
    for i, T in enumerate([60, 40]):
        full = make_codes(tiny_model, [T], seed=i)[0]
        torch.save(full[1 : 1 + tiny_model.dep_q].clone(), codes_dir / f"book_{i}.pt")
    out = tmp_path / "out"
    assert main(["--codes", str(codes_dir), "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model tiny: streaming differs"), err
    assert "book_0, audio codebook" in err[0] and "frame" in err[0]  # the longest file is verified first
    assert "updates it only in forward" in err[0]  # the likely cause, in words
    assert not (out / "results.json").exists()
    assert not list((out / "partial").rglob("*.json")) or all(p.name == "run.json" for p in (out / "partial").rglob(
        "*.json"))  # no sequence of the model was saved
    # The same model with --no-verify runs to the end: what the check stopped was a real difference.
    assert main(["--codes", str(codes_dir), "--out", str(tmp_path / "unchecked"), "-q", "--no-verify"]) == 0


def test_triton_kernel_under_the_interpreter(tmp_path):
    from fused_stream.kernels.cross_entropy import triton_interpreted

    if not triton_interpreted():
        pytest.skip("TRITON_INTERPRET is not set (a CUDA machine): the GPU tests cover the compiled kernel")
    out = tmp_path / "out"
    assert main(["--generate", "1", "--frames", "12", "--chunk-size", "4", "--loss-backend", "triton",
                 "--out", str(out), "-q"]) == 0
    assert _strict_json(out / "results.json")["models"][0]["report"]["loss_backend"] == "triton"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "no/such/checkpoint"], "no/such/checkpoint"),
        (["--codes", "no/such/dir"], "no/such/dir"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--dtype", "float8"], "--dtype"),
        (["--audio", "somewhere"], "--mimi"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and len(err.splitlines()) == 1
    assert _outputs(out) == []


def test_codes_file_of_the_wrong_shape_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(3, 20, dtype=torch.long), bad)  # 3 streams: neither dep_q=8 audio nor K=17
    out = tmp_path / "out"
    assert main(["--codes", str(bad), "--out", str(out)]) == 2
    assert "bad.pt" in capsys.readouterr().err and _outputs(out) == []


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fused_stream.eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for option in ("--model", "--audio", "--mimi", "--codes", "--verify", "--config", "--text-fill", "--other-fill",
                   "--codebook-weights", "--window", "--concat-chapters", "--max-frames"):
        assert option in proc.stdout


# --------------------------------------------------------------------------------------------------------------
# Audio: LibriLight layout -> Mimi (a small random-weight checkpoint through moshi's loader) -> the model
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def librilight(tmp_path_factory):
    """speaker/book/chapter_N.flac with speech-like audio at 16 kHz (resampled to Mimi's 24 kHz)."""
    from audio_fixtures import speech_like, write_flac

    root = tmp_path_factory.mktemp("librilight")
    for book, seconds in (("100/bookA", (2.0, 1.5)), ("200/bookB", (2.5,))):
        (root / book).mkdir(parents=True)
        for i, length in enumerate(seconds, start=1):
            write_flac(root / book / f"chapter_{i}.flac", speech_like(length, 16000, seed=i), 16000)
    return root


def _mimi(tmp_path_factory, card):
    from fused_stream.data.mimi import random_mimi, save_mimi_checkpoint, small_mimi_config

    config = small_mimi_config(card=card)
    return save_mimi_checkpoint(random_mimi(config, seed=0), tmp_path_factory.mktemp(f"mimi{card}") / "ckpt", config)


@pytest.fixture(scope="module")
def mimi_ckpt(tmp_path_factory):
    return _mimi(tmp_path_factory, 64)  # the tiny preset's card


def test_audio_end_to_end_with_concatenated_chapters(tmp_path, librilight, mimi_ckpt):
    out = tmp_path / "out"
    argv = ["--audio", str(librilight), "--mimi", str(mimi_ckpt), "--concat-chapters", "--out", str(out), "-q"]
    assert main(argv + ["--verify"]) == 0
    results = _strict_json(out / "results.json")
    frames = {d["name"]: d["frames"] for d in results["data"]}
    assert frames == {"100/bookA": 25 + 19, "200/bookB": 32}  # ceil(seconds x 12.5) per chapter, joined in order
    assert results["models"][0]["report"]["verification"]["passed"]
    cached = sorted((out / "cache").glob("*.safetensors"))
    assert len(cached) == 3  # one per chapter file
    assert main(argv) == 0  # rerun: every file from the cache
    assert sorted((out / "cache").glob("*.safetensors")) == cached


def test_the_finetune_blocks_audio_dir_selects_the_audio(tmp_path, librilight, mimi_ckpt, capsys):
    """`paper_metrics.librilight_audio_dir` beside the `librilight_streaming` block, as finetune configs hold it."""
    config = tmp_path / "train.yaml"
    config.write_text(f"paper_metrics:\n  librilight_audio_dir: {librilight}\n  librilight_concat_chapters: true\n"
                      "  other_metric_key: 7\n  librilight_streaming:\n    enabled: true\n"
                      "    max_sequence_length: 30\n    cache_clear_interval: 100\n")
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 2  # audio, not the demo: it needs a Mimi
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--mimi" in err and str(librilight) in err and len(err.splitlines()) == 1
    assert _outputs(out) == []
    assert main(["--config", str(config), "--mimi", str(mimi_ckpt), "--out", str(out), "-q"]) == 0
    results = _strict_json(out / "results.json")
    assert {d["name"]: d["frames"] for d in results["data"]} == {"100/bookA": 30, "200/bookB": 30}
    assert results["config"]["audio"] == str(librilight) and results["config"]["max_frames"] == 30


def test_mimi_card_mismatch_exits_2(tmp_path, librilight, tmp_path_factory, capsys, monkeypatch):
    import fused_stream.cli.run as run_module

    monkeypatch.setattr(run_module, "open_model", None)  # checked before any model loads
    wrong = _mimi(tmp_path_factory, 128)
    out = tmp_path / "out"
    assert main(["--audio", str(librilight), "--mimi", str(wrong), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "card" in err and len(err.strip().splitlines()) == 1 and _outputs(out) == []


def test_unreadable_audio_exits_2(tmp_path, mimi_ckpt, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "broken.flac").write_bytes(b"not audio at all" * 64)
    out = tmp_path / "out"
    assert main(["--audio", str(audio), "--mimi", str(mimi_ckpt), "--out", str(out)]) == 2
    assert "broken.flac" in capsys.readouterr().err and _outputs(out) == []


# --------------------------------------------------------------------------------------------------------------
# Nothing lost: a killed run resumes to the same numbers; bad files are isolated; torchrun shards and reduces
# --------------------------------------------------------------------------------------------------------------
def _cli(*args):
    return [sys.executable, "-m", "fused_stream.eval", *args]


def _codes_dir(tmp_path, model, make_codes, lengths):
    directory = tmp_path / "codes"
    directory.mkdir()
    for i, T in enumerate(lengths):
        torch.save(make_codes(model, [T], seed=100 + i)[0].clone(), directory / f"f{i}.pt")  # full [17, T]
    return directory


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path, tiny_model, make_codes):
    import os
    import signal
    import time

    data = _codes_dir(tmp_path, tiny_model, make_codes, [400, 380, 360, 340, 320, 300])
    common = ["--codes", str(data), "--batch-size", "1", "-q", "--no-verify"]
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    whole = tmp_path / "whole"
    subprocess.run(_cli(*common, "--out", str(whole)), check=True, env=env, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(out)), env=env)
    partial = out / "partial" / "tiny"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(partial.glob("*.pt"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = len(list(partial.glob("*.pt")))
    assert 1 <= saved < 6, "the kill should land mid-run"
    assert not (out / "results.json").exists()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # a killed run cannot clean up ...
    subprocess.run(_cli(*common, "--out", str(out), "--resume"), check=True, env=env, timeout=600)
    assert not (out / ".lock").exists()  # ... and its stale lock is taken over
    resumed, expected = _strict_json(out / "results.json"), _strict_json(whole / "results.json")
    assert resumed["models"][0]["report"]["resumed_sequences"] == saved
    assert resumed["models"][0]["metrics"] == expected["models"][0]["metrics"]  # bit-identical float64 sums
    assert resumed["data"] == expected["data"]


def test_sigterm_stops_and_says_how_to_resume(tmp_path, tiny_model, make_codes, capsys):
    import os
    import signal
    import time

    data = _codes_dir(tmp_path, tiny_model, make_codes, [600, 600, 600, 600])
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("--codes", str(data), "--batch-size", "1", "--out", str(out), "-q"),
                            env=dict(os.environ, NO_TORCH_COMPILE="1"), stderr=subprocess.PIPE, text=True)
    partial = out / "partial" / "tiny"
    deadline = time.time() + 300
    while time.time() < deadline and not list(partial.glob("*.pt")) and proc.poll() is None:
        time.sleep(0.02)
    saved = sorted(partial.glob("*.pt"))
    assert main(["--codes", str(data), "--out", str(out), "-q", "--resume"]) == 2  # a second run on the same --out
    assert f"pid {proc.pid}" in capsys.readouterr().err
    assert sorted(partial.glob("*.pt"))[: len(saved)] == saved
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in err and "SIGTERM" in err
    assert not (out / "results.json").exists() and list(partial.glob("*.pt"))
    assert not (out / ".lock").exists()


def test_a_corrupt_file_among_good_ones_is_recorded_and_the_rest_evaluated(tmp_path, tiny_model, make_codes, capsys):
    data = _codes_dir(tmp_path, tiny_model, make_codes, [40, 30])
    (data / "f1_broken.pt").write_bytes(b"definitely not a torch file")
    out = tmp_path / "out"
    assert main(["--codes", str(data), "--out", str(out), "-q"]) == 1
    assert "f1_broken" in capsys.readouterr().err
    results = _strict_json(out / "results.json")
    assert [d["name"] for d in results["data"]] == ["f0", "f1"]
    (failure,) = results["failed"]
    assert failure["name"] == "f1_broken" and "f1_broken.pt" in failure["reason"]
    assert main(["--codes", str(data), "--out", str(tmp_path / "again"), "-q", "--keep-going"]) == 0
    assert main(["--codes", str(data), "--out", str(tmp_path / "short"), "-q", "--keep-going",
                 "--min-frames", "35"]) == 0
    assert [f["name"] for f in _strict_json(tmp_path / "short" / "results.json")["failed"]] == ["f1", "f1_broken"]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_model, make_codes):
    import os

    data = _codes_dir(tmp_path, tiny_model, make_codes, [90, 70, 60, 40])
    # Batch size 1: every sequence runs alone in both layouts (other batch sizes round differently in float32).
    common = ["--codes", str(data), "--window", "20", "-q", "--no-verify", "--device", "cpu", "--batch-size", "1"]
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    subprocess.run(_cli(*common, "--out", str(one)), check=True, env=env, timeout=600)
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "fused_stream.eval", *common, "--out", str(two)], check=True, env=env, timeout=600)
    a, b = _strict_json(one / "results.json"), _strict_json(two / "results.json")
    assert a["data"] == b["data"]
    assert len(b["models"][0]["report"]["ranks"]) == 2
    ma, mb = a["models"][0]["metrics"], b["models"][0]["metrics"]
    assert ma["flat"].keys() == mb["flat"].keys() and ma["n_sequences"] == mb["n_sequences"] == 4
    for key, value in ma["flat"].items():
        assert mb["flat"][key] == pytest.approx(value, abs=1e-9)
    for wa, wb in zip(ma["windows"], mb["windows"], strict=True):
        assert wb["combined"] == pytest.approx(wa["combined"], abs=1e-9) and wa["count"] == wb["count"]
    rows_a = list(csv.reader((one / "per_position.csv").open()))
    rows_b = list(csv.reader((two / "per_position.csv").open()))
    assert len(rows_a) == len(rows_b) == 91


def test_a_model_and_the_same_model_with_ttt_side_by_side(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "base=tiny", "--model", "ttt=tiny", "--ttt", "ttt:layers=0,1,mb=4,alpha=0.5",
            "--generate", "2", "--frames", "40", "--out", str(out), "-q", "--verify"]
    assert main(argv) == 0
    results = _strict_json(out / "results.json")
    base, ttt = results["models"]
    assert "ttt" not in base["report"]
    assert base["report"]["verification"]["passed"] and ttt["report"]["verification"]["passed"]
    assert set(ttt["report"]["ttt"]["layers"]) == {"transformer.layers.0.ttt", "transformer.layers.1.ttt"}
    assert all(layer["weights_changed"] for layer in ttt["report"]["ttt"]["layers"].values())
    assert ttt["parameters"] > base["parameters"]
    assert base["metrics"]["overall"]["combined"] != ttt["metrics"]["overall"]["combined"]


def test_ttt_option_errors(tmp_path, capsys):
    assert main(["--ttt", "nobody:layers=1", "--out", str(tmp_path)]) == 2
    assert "no --model is labelled 'nobody'" in capsys.readouterr().err
    assert main(["--ttt", "tiny:layers=1,mb=x", "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------------------------
# No silent wrong numbers: --resume trusts content, not paths; labels never share a folder; start-up and threads
# --------------------------------------------------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_overwritten_at_the_same_path(tmp_path, capsys):
    from fused_stream.data.models import load_model, preset_config, save_checkpoint

    ckpt = save_checkpoint(load_model("tiny", device="cpu", seed=0), tmp_path / "ckpt", preset_config("tiny"))
    out = tmp_path / "out"
    argv = ["--model", f"m={ckpt}", "--generate", "2", "--frames", "20", "--out", str(out), "-q", "--no-verify"]
    assert main(argv) == 0
    assert main(argv + ["--resume"]) == 0  # the same file: resumed
    assert _strict_json(out / "results.json")["models"][0]["report"]["resumed_sequences"] == 2
    before = (out / "results.json").read_bytes()
    save_checkpoint(load_model("tiny", device="cpu", seed=1), ckpt, preset_config("tiny"))  # other weights
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_weights" in err and "changed" in err
    assert (out / "results.json").read_bytes() == before
    assert main(argv) == 0 and _strict_json(out / "results.json")["models"][0]["report"]["resumed_sequences"] == 0


def test_resume_refuses_a_mimi_overwritten_at_the_same_path(tmp_path, librilight, capsys):
    from fused_stream.data.mimi import random_mimi, save_mimi_checkpoint, small_mimi_config

    config = small_mimi_config(card=64)
    mimi = save_mimi_checkpoint(random_mimi(config, seed=0), tmp_path / "mimi", config)
    out = tmp_path / "out"
    argv = ["--audio", str(librilight), "--mimi", str(mimi), "--max-frames", "12", "--out", str(out), "-q"]
    assert main(argv) == 0
    save_mimi_checkpoint(random_mimi(config, seed=1), mimi, config)
    assert main(argv + ["--resume"]) == 2
    assert "mimi_checkpoint" in capsys.readouterr().err


def test_a_cache_dir_that_is_a_file_fails_before_any_model_or_encoding(tmp_path, librilight, mimi_ckpt, capsys,
                                                                       monkeypatch, encode_calls):
    import fused_stream.cli.run as run_module

    monkeypatch.setattr(run_module, "open_model", None)
    cache = tmp_path / "cache"
    cache.write_text("")
    out = tmp_path / "out"
    assert main(["--audio", str(librilight), "--mimi", str(mimi_ckpt), "--cache-dir", str(cache),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cache-dir" in err and len(err.splitlines()) == 1 and not out.exists() and encode_calls == []


def test_labels_that_look_alike_on_disk_resume_their_own_results(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "a b=tiny", "--model", "a_b=tiny", "--ttt", "a_b:layers=0", "--generate", "2",
            "--frames", "20", "--out", str(out), "-q", "--no-verify"]
    assert main(argv) == 0
    fresh = {m["label"]: m["metrics"] for m in _strict_json(out / "results.json")["models"]}
    assert fresh["a b"] != fresh["a_b"]  # with and without TTT
    assert main(argv + ["--resume"]) == 0
    resumed = _strict_json(out / "results.json")["models"]
    assert [m["report"]["resumed_sequences"] for m in resumed] == [2, 2]
    assert {m["label"]: m["metrics"] for m in resumed} == fresh


def test_ctrl_c_while_importing_prints_one_line_and_exits_130():
    import signal
    import time

    proc = subprocess.Popen(_cli("--help"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # inside the imports of torch and moshi (seconds)
    if proc.poll() is not None:
        pytest.skip("the imports finished before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and "usage" in out:
        pytest.skip("the imports finished before the signal arrived")
    if proc.returncode == -signal.SIGINT:  # died of the default handler: the signal came before ours was installed
        pytest.skip("the signal arrived before the package began to import")
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["interrupted while starting: nothing was evaluated or written"]


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_set_once_and_recorded(tmp_path, keep_torch_threads, monkeypatch):
    import fused_stream.cli.main as cli_main

    out = tmp_path / "out"
    assert main(["--generate", "1", "--frames", "8", "--threads", "1", "--out", str(out), "-q"]) == 0
    results = _strict_json(out / "results.json")
    assert results["environment"]["threads"] == 1 and results["config"]["threads"] == 1
    assert results["environment"]["cpus_available"] >= 1
    assert main(["--threads", "0", "--out", str(out)]) == 2
    monkeypatch.setattr(cli_main, "available_cpus", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli_main.auto_threads() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli_main.auto_threads() == 3


def test_threads_on_busy_cpus_are_warned_about_not_changed(keep_torch_threads, monkeypatch, caplog):
    """The thread count changes the last bits of the losses: it must not follow the load of other processes."""
    import logging

    import fused_stream.cli.main as cli_main

    monkeypatch.setattr(cli_main, "idle_cpus", lambda: 1.0)  # one of four CPUs idle
    with caplog.at_level(logging.WARNING, logger="fused_stream.eval"):
        assert cli_main.set_threads(4) == 4 and torch.get_num_threads() == 4
        cli_main.warn_busy_cpus(4)
    assert "--threads 1" in caplog.text
    caplog.clear()
    monkeypatch.setattr(cli_main, "idle_cpus", lambda: 3.9)
    with caplog.at_level(logging.WARNING, logger="fused_stream.eval"):
        cli_main.warn_busy_cpus(4)
    assert caplog.text == ""


def test_more_threads_than_usable_cpus_are_warned_about(keep_torch_threads, monkeypatch, caplog):
    import logging

    import fused_stream.cli.main as cli_main

    monkeypatch.setattr(cli_main, "available_cpus", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="fused_stream.eval"):
        assert cli_main.set_threads(8) == 8 and torch.get_num_threads() == 8  # kept: it decides the last bits
    assert "--threads 8 is more than the 2 CPU(s)" in caplog.text and "--threads 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fused_stream.eval"):
        cli_main.set_threads(2)
    assert caplog.text == ""


def test_bad_input_is_one_line_even_on_busy_cpus(tmp_path, capsys, monkeypatch):
    import fused_stream.cli.main as cli_main

    monkeypatch.setattr(cli_main, "idle_cpus", lambda: 0.1)
    assert main(["--codes", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
