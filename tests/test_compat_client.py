"""The drop-in, played by its client: a moshi-finetune training loop that builds
`PaperMetricsEvaluator(mimi, interleaved_tokenizer, config=args.paper_metrics)` once and logs `evaluate_all(model)`
every N steps inside a try/except that only logs. Each test: the documented result, or a one-line refusal naming
the fix; never other data, other definitions, or a changed model."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from audio_fixtures import speech_like, write_flac
from client_fixtures import BOOK, MOSHI_FINETUNE_EXAMPLE, PAPER_METRICS_YAML, attach_client_ttt, client_config

from fused_stream import EvalConfig, ParityError, StreamingEvaluator, evaluate_long_context_loss
from fused_stream.cli.main import main
from fused_stream.compat import PaperMetricsEvaluator
from fused_stream.core.config import ConfigError
from fused_stream.metrics import PositionSums, compute_metrics
from fused_stream.verify.reference import batch_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

CARD = 64  # the tiny preset's audio card
# The client's book (4 chapters, 6 s each = 75 frames) and another speaker's book.
CHAPTERS = [f"{BOOK}/emerald_city_{i:02d}_baum_64kb.flac" for i in (1, 2, 3, 4)] + ["200/other_book/ch_01.flac"]


@pytest.fixture(scope="module")
def librilight(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    for i, rel in enumerate(CHAPTERS):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_flac(root / rel, speech_like(6.0, 16000, seed=i), 16000)
    return root


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(model, before):
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------ its config, its data
def test_the_clients_config_evaluates_its_book_and_nothing_else(tiny_model, mimi_setup, librilight, tmp_path,
                                                                 encode_calls):
    mimi, ckpt = mimi_setup
    config = client_config(librilight)
    evaluator = PaperMetricsEvaluator(mimi, object(), config=config["paper_metrics"])
    encode_calls.clear()
    ours = evaluator.evaluate_all(tiny_model)
    # its single book, first 3 of its 4 chapters, joined: 3 x 75 frames; the other book is never encoded
    assert ours["librilight_samples"] == 1 and len(encode_calls) == 3 * 2  # 2 streaming chunks of 4 s per chapter
    assert all(key.startswith("librilight_") for key in ours) and ours["librilight_metrics_version"] == 2
    # The same training config through the CLI: its paper_metrics block only, the same numbers.
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "cli"
    assert main(["--config", str(path), "--mimi", str(ckpt), "--model", "tiny", "--device", "cpu", "--dtype",
                 "float32", "--out", str(out), "-q", "--threads", "1"]) == 0  # one thread, as this test: same bits
    results = json.loads((out / "results.json").read_text())
    cli = results["models"][0]["metrics"]["flat"]
    assert set(cli) == set(ours) and all(math.isclose(cli[k], v, rel_tol=0, abs_tol=1e-9) for k, v in ours.items())
    assert results["config"]["batch_size"] == "auto"  # the training's batch_size: 1 is not the evaluation's
    assert [d["name"] for d in results["data"]] == [BOOK]
    assert results["models"][0]["metrics"]["flat_definitions"]["keys"]["librilight_slope"]["legacy"]


def test_every_client_key_has_a_stated_meaning(mimi_setup, librilight, caplog):
    mimi, _ = mimi_setup
    with caplog.at_level("INFO"):
        PaperMetricsEvaluator(mimi, None, config=client_config(librilight)["paper_metrics"])
    text = caplog.text
    for key in ("memory_log_interval", "use_fixed_method", "cache_clear_interval", "paper_metrics_use_silence"):
        assert f"{key} accepted, sets nothing" in text
    assert "sblimp_audio_dir" in text and "LibriLight loss only" in text
    assert "librilight_streaming.verify_loss_computation" in text  # read: it is `verify`


@pytest.mark.parametrize("changes,match", [
    ({"librilight_evaluation_mode": "random"}, "librilight_evaluation_mode 'random' is not one of"),
    ({"librilight_max_chapter": 3}, "unknown key 'librilight_max_chapter'"),
    ({"librilight_streaming": {"use_fixed_method": False}}, "legacy separate-forward-pass"),
    ({"librilight_book_name": "no_such_book"}, "book 100/no_such_book not found"),
])
def test_a_key_it_cannot_honour_is_refused_by_name(mimi_setup, librilight, changes, match):
    mimi, _ = mimi_setup
    with pytest.raises((ConfigError, ValueError), match=match):
        evaluator = PaperMetricsEvaluator(mimi, None, config=client_config(librilight, **changes)["paper_metrics"])
        evaluator._groups()


def test_multi_book_is_one_seeded_sample_for_the_whole_training_run(mimi_setup, librilight):
    mimi, _ = mimi_setup
    config = client_config(librilight, librilight_evaluation_mode="multi_book", librilight_max_chapters=1,
                           librilight_num_sequences=2)["paper_metrics"]
    groups = PaperMetricsEvaluator(mimi, None, config=config)._groups()
    assert [name for name, _ in groups] == [BOOK, "200/other_book"]
    assert PaperMetricsEvaluator(mimi, None, config=config)._groups() == groups  # every evaluation: the same books


def test_moshi_finetunes_own_example_config_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "moshi_7B.yaml"
    path.write_text(MOSHI_FINETUNE_EXAMPLE)
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "training config without a paper_metrics block" in err and "unknown key" not in err
    # with a paper_metrics block, its batch_size: 16 stays the training's
    config = yaml.safe_load(MOSHI_FINETUNE_EXAMPLE) | {"paper_metrics": {"librilight_window": 50}}
    from fused_stream.options.settings import read_config

    path.write_text(yaml.safe_dump(config))
    assert read_config(path) == {"window": 50}


# --------------------------------------------------------------------------------------------- its definitions
def test_its_training_weighting_applies_to_the_flat_keys(tiny_model, make_codes):
    codes = make_codes(tiny_model, [1100], seed=5)
    result = evaluate_long_context_loss(tiny_model, codes, first_codebook_weight=100.0, window=100, verify=False)
    plain = evaluate_long_context_loss(tiny_model, codes, window=100, verify=False)
    # independent reference: the driver's per-row losses, weighted by hand in float64
    losses = StreamingEvaluator(tiny_model, EvalConfig(verify=False)).evaluate(codes).losses[0].double()  # [8, T]
    w = torch.tensor([100.0] + [1.0] * 7, dtype=torch.float64)[:, None].expand_as(losses)
    ok = ~losses.isnan()
    pooled = float((w * losses.nan_to_num())[ok].sum() / w[ok].sum())
    assert math.isclose(result["librilight_loss_overall"], pooled, rel_tol=1e-9)
    per_position = ((w * losses.nan_to_num()) * ok).sum(0) / (w * ok).sum(0)  # [T]
    assert math.isclose(result["librilight_loss_1k"], float(per_position[950:1050].mean()), rel_tol=1e-9)
    assert result["librilight_loss_1k"] != plain["librilight_loss_1k"]
    assert result["metrics"]["flat_definitions"]["curve"] == "weighted"


# ---------------------------------------------------------------------------------------------- its TTT layer
def test_its_ttt_layer_fails_verification_past_its_first_update_and_comes_back_unchanged(tiny_model, make_codes):
    """The client's layer at its real chunk size (256) updates its weight after frame 256: the default
    verification reaches past it (2 updates), at batch size 1 (the layer takes one sequence at a time)."""
    model = copy.deepcopy(tiny_model)
    (ttt,) = attach_client_ttt(model, [1], chunk_size=256)
    before = _snapshot(model)
    codes = make_codes(model, [300, 290], seed=7)
    with pytest.raises(ParityError) as caught:
        evaluate_long_context_loss(model, codes, batch_size=1)
    assert caught.value.position >= 255  # not before its first update
    _assert_bitwise(model, before)
    assert ttt._inference_z_buffer is None


def test_a_trained_client_layer_is_caught_and_handed_back_trained(tiny_model, make_codes):
    model = copy.deepcopy(tiny_model)
    (ttt,) = attach_client_ttt(model, [0], chunk_size=256, trained=True)
    before = _snapshot(model)
    with pytest.raises(ParityError):  # its reset copies the pretrained weight: the stream is another model
        evaluate_long_context_loss(model, make_codes(model, [60], seed=1), batch_size=1)
    _assert_bitwise(model, before)  # w_down is the trained weight again, bit for bit


def test_chunks_are_refused_or_fall_back_to_frames_for_its_layer(tiny_model, make_codes):
    model = copy.deepcopy(tiny_model)
    attach_client_ttt(model, [1], chunk_size=8)
    codes = make_codes(model, [40], seed=2)
    with pytest.raises(ConfigError, match="chunk_size=4 is refused: layers not known to stream chunks exactly"):
        evaluate_long_context_loss(model, codes, chunk_size=4, verify=False)
    result = evaluate_long_context_loss(model, codes, chunk_size="auto", verify=False)
    assert result["report"]["chunk_size"] == 1 and "ClientTTTGating" in result["report"]["chunk_choice"]
    layer = result["report"]["ttt"]["layers"]["transformer.layers.1.gating"]  # found by what it does
    assert layer["weights_changed"] is True and layer["relative_change"][0] > 0


def test_a_foreign_layer_without_a_period_is_verified_over_at_least_512_frames(tiny_model, make_codes):
    model = copy.deepcopy(tiny_model)
    attach_client_ttt(model, [1], chunk_size=300, announce=False)
    result = evaluate_long_context_loss(model, make_codes(model, [100], seed=1), batch_size=1)
    verification = result["report"]["verification"]
    assert verification["required_frames"] == 512 + 1 + 8 and verification["frames"] == [100]
    assert verification["reaches_updates"] is True  # the whole sequence is verified
    with_period = copy.deepcopy(tiny_model)
    attach_client_ttt(with_period, [1], chunk_size=300)
    report = evaluate_long_context_loss(with_period, make_codes(model, [100], seed=1), batch_size=1)["report"]
    assert report["verification"]["required_frames"] == 2 * 300 + 1 + 8


# ------------------------------------------------------------------------------------- its wrapped models
def test_a_train_mode_lora_model_is_evaluated_in_eval_mode_and_handed_back(tiny_model, make_codes):
    from moshi.modules.lora import replace_all_linear_with_lora

    model = copy.deepcopy(tiny_model)
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    before, flags = _snapshot(model), [(m, m.training) for m in model.modules()]
    codes = make_codes(model, [50, 40], seed=4)
    result = evaluate_long_context_loss(model, codes)
    reference = batch_losses(copy.deepcopy(model).eval(), codes)
    expected = compute_metrics(PositionSums.from_result(reference), context=model.context, window=1000)
    assert math.isclose(result["librilight_loss_overall"], expected["overall"]["combined"], rel_tol=1e-5)
    _assert_bitwise(model, before)
    assert all(m.training == was for m, was in flags)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora" in n}


def test_a_ddp_wrapped_model_is_unwrapped(tiny_model, make_codes, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = copy.deepcopy(tiny_model)
        codes = make_codes(model, [30, 20], seed=3)
        wrapped = evaluate_long_context_loss(DistributedDataParallel(model), codes)
        plain = evaluate_long_context_loss(model, codes)
        assert wrapped["librilight_loss_overall"] == plain["librilight_loss_overall"]
    finally:
        dist.destroy_process_group()


def test_an_fsdp_model_is_refused_with_the_way_to_call(tiny_model, make_codes):
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # the type is what is checked
    with pytest.raises(TypeError, match="FSDP.*get_model_state_dict"):
        evaluate_long_context_loss(fsdp, make_codes(tiny_model, [10], seed=0))


@pytest.mark.slow
def test_two_ranks_share_the_sequences_and_equal_one_process(tmp_path, tiny_model, make_codes):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch, torch.distributed as dist
        from fused_stream import evaluate_long_context_loss
        from fused_stream.data.codes import generate_codes
        from fused_stream.data.models import load_model
        dist.init_process_group("gloo")
        model = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
        codes = generate_codes(model, 4, [90, 70, 60, 40], seed=9)
        out = evaluate_long_context_loss(model, codes, window=20, batch_size=1, verify=False)
        flat = {{k: v for k, v in out.items() if k.startswith("librilight_")}}
        json.dump({{"flat": flat, "n": out["report"].get("world_size")}},
                  open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w"))
        dist.destroy_process_group()
    """))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                   check=True, env=env, timeout=600)
    from fused_stream.data.codes import generate_codes

    one = evaluate_long_context_loss(tiny_model, generate_codes(tiny_model, 4, [90, 70, 60, 40], seed=9), window=20,
                                     batch_size=1, verify=False)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == 2 and got["flat"]["librilight_samples"] == 4
        for key, value in got["flat"].items():
            assert math.isclose(value, one[key], rel_tol=0, abs_tol=1e-9), key


def test_the_yaml_here_is_the_clients(librilight):
    """The fixture keeps the client's paper_metrics keys as its training config has them."""
    block = yaml.safe_load(PAPER_METRICS_YAML)["paper_metrics"]
    assert block["librilight_evaluation_mode"] == "single_book" and block["librilight_max_chapters"] == 3
    assert set(block["librilight_streaming"]) >= {"memory_log_interval", "use_fixed_method", "verify_loss_computation"}
