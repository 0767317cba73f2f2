"""`python -m fused_stream.eval`: the default job runs end to end and checks itself against the batch path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fused_stream.eval import main


def test_main_reports_parity_for_frame_and_chunk_mode(capsys):
    assert main(["--generate", "2", "--frames", "40", "--chunk-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "streaming C=1" in out and "streaming C=8" in out
    assert out.count("masks identical: True") == 2


def test_main_runs_the_triton_kernel_under_the_interpreter(capsys):
    from fused_stream.kernels.cross_entropy import triton_interpreted

    if not triton_interpreted():
        pytest.skip("TRITON_INTERPRET is not set (a CUDA machine): the GPU tests cover the compiled kernel")
    assert main(["--generate", "1", "--frames", "12", "--chunk-size", "4", "--loss-backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "streaming C=4 (triton)" in out and out.count("masks identical: True") == 2


def test_main_fails_when_streaming_disagrees(monkeypatch, capsys):
    import fused_stream.eval as cli

    real = cli.batch_losses

    def shifted(model, codes):
        result = real(model, codes)
        result.losses += 0.5
        return result

    monkeypatch.setattr(cli, "batch_losses", shifted)
    assert main(["--generate", "1", "--frames", "20", "--chunk-size", "1"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_main_fails_when_masks_disagree(monkeypatch, capsys):
    import fused_stream.eval as cli

    real = cli.batch_losses

    def one_more_valid(model, codes):
        result = real(model, codes)
        result.valid[0, 1, -1] = True  # a position LMModel.forward would mask
        return result

    monkeypatch.setattr(cli, "batch_losses", one_more_valid)
    assert main(["--generate", "1", "--frames", "20", "--chunk-size", "1"]) == 1
    assert "masks identical: False" in capsys.readouterr().out


BAD_ARGS = [["--chunk-size", "0"], ["--generate", "0"], ["--frames", "-1"], ["--batch-size", "-2"], ["--dtype", "int8"]]


@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_arguments_exit_2(args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


def test_module_runs_with_no_arguments():
    proc = subprocess.run([sys.executable, "-m", "fused_stream.eval"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "parity C=16: masks identical: True" in proc.stdout


def test_unknown_model_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "fused_stream.eval", "--model", "/no/such/ckpt"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "/no/such/ckpt" in proc.stderr


def test_main_reports_memory_and_graph_status(capsys):
    assert main(["--generate", "2", "--frames", "24", "--chunk-size", "4", "--batch-size", "auto",
                 "--verify-graph", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory (rss)") == 2 and "run estimate" in out and "graphs: device is cpu" in out


def test_main_rejects_graphs_on_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can capture")
    assert main(["--generate", "1", "--frames", "8", "--cuda-graphs", "on"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
