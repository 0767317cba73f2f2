"""Roofline and MFU helpers: known GPUs only, bounds checked by hand."""

from __future__ import annotations

import pytest
import torch

from fused_stream.core.config import EvalConfig
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.measure.throughput import (
    chunk_mfu,
    flops_per_frame,
    format_throughput,
    frame_roofline,
    gpu_spec,
    headline_rate,
    throughput_report,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA GeForce XYZ", None),
        ("NVIDIA GH200 480GB", None),
        ("cpu", None),
    ],
)
def test_gpu_spec(name, expected):
    spec = gpu_spec(name)
    assert (spec.name if spec else None) == expected


def test_gpu_spec_values():
    h100 = gpu_spec("NVIDIA H100 80GB HBM3")
    assert h100 is not None and (h100.hbm_bytes_per_s, h100.bf16_dense_flops) == (3.35e12, 989e12)


def test_frame_roofline_by_hand():
    # Moshi-7B, B = 1: 15.4 GB of weights + 1.57 GB of KV cache read per frame
    assert frame_roofline(15_400_000_000, 1_570_000_000, 1, 3.35e12) == pytest.approx(3.35e12 / 16.97e9)
    # B = 8: weights amortised over 8 frames, 1.925e9 + 1.57e9 = 3.495e9 bytes per frame
    assert frame_roofline(15_400_000_000, 1_570_000_000, 8, 3.35e12) == pytest.approx(3.35e12 / 3.495e9)
    with pytest.raises(ValueError):
        frame_roofline(1, 1, 0, 1.0)


def test_chunk_mfu_by_hand():
    # 500 frames/s at 2 x 7.7e9 FLOPs per frame on a 989 TFLOP/s card: 7.7e12 / 989e12
    assert chunk_mfu(500.0, 2 * 7.7e9, 989e12) == pytest.approx(7.7e12 / 989e12)


# --- the real thing -------------------------------------------------------------------------------------------------


def test_flops_per_frame_by_hand(tiny_model):
    """2 FLOPs per non-embedding weight, plus QK^T and AV over the full context in every temporal layer."""
    embedding_tables = {"emb", "text_emb", "depformer_emb", "depformer_text_emb"}
    weights = sum(p.numel() for n, p in tiny_model.named_parameters() if n.split(".")[0] not in embedding_tables)
    layers, dim, context = 2, 32, 16  # the tiny preset
    assert flops_per_frame(tiny_model) == 2 * weights + 2 * 2 * layers * dim * context


# --- the headline: the steady rate first, the overall one (setup included) beside it ---------------------------------


def test_throughput_report_headline_is_the_steady_rate(tiny_model):
    memory = {"frames": 1000, "frames_per_second": 400.0, "steady_frames_per_second": 500.0}
    out = throughput_report(tiny_model, 1, {}, memory, torch.device("cpu"), steps=100, seconds=4.0)
    assert out["headline_frames_per_second"] == 500.0 and out["headline"] == "steady"
    assert out["overall_frames_per_second"] == 250.0  # 1000 frames / 4 s of wall time, setup included
    assert out["steps_per_second"] == 25.0 and "bound_reason" in out  # the CPU has no roofline
    line = format_throughput(out)
    assert line.startswith("500.0 frames/s steady") and "250.0 frames/s overall incl. setup" in line


def test_throughput_report_headline_falls_back_and_says_so(tiny_model):
    memory = {"frames": 10, "frames_per_second": 40.0, "steady_frames_per_second": None}
    out = throughput_report(tiny_model, 4, {}, memory, torch.device("cpu"), steps=3, seconds=1.0)
    assert out["headline_frames_per_second"] == 40.0 and out["headline"].startswith("overall")
    assert headline_rate({}) == (None, "not measured")
    assert format_throughput({}) == "frames/s not measured"


def test_format_throughput_names_the_bound():
    line = format_throughput({"headline_frames_per_second": 90.0, "headline": "steady",
                              "overall_frames_per_second": 60.0, "roofline_ratio": 0.625, "gpu": "H200"})
    assert line == "90.0 frames/s steady; 60.0 frames/s overall incl. setup; 62.5 % of the H200 roofline"


def test_the_driver_report_carries_the_headline(tiny_model, make_codes):
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=4)).evaluate(make_codes(tiny_model, [40], seed=0))
    throughput = result.report["throughput"]
    assert {"headline_frames_per_second", "headline", "overall_frames_per_second"} <= set(throughput)
    assert throughput["overall_frames_per_second"] == pytest.approx(result.report["frames_per_second"])


def test_the_roofline_counts_the_kv_slots_a_step_reads(tiny_model, monkeypatch):
    """The step reads the filled ring slots, not the whole ring: a run that attends a quarter of the ring on average
    has a quarter of the KV bytes per frame (by hand: 16e9 of weights at B = 8, 1.6e9 of KV per sequence)."""
    import fused_stream.measure.throughput as throughput

    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    preflight = {"estimate": {"weights": 16e9, "kv_cache": 8 * 1.6e9}, "batch_size": 8}
    memory = {"frames": 8000, "steady_frames_per_second": 1000.0}
    quarter = throughput_report(tiny_model, 1, preflight, memory, torch.device("cuda"), steps=1000, seconds=10.0,
                                kv_read_fraction=0.25)
    assert quarter["bytes_per_frame"] == pytest.approx(2e9 + 0.4e9)
    assert quarter["roofline_frames_per_second"] == pytest.approx(4.8e12 / 2.4e9)
    assert quarter["roofline_ratio"] == pytest.approx(1000.0 / 2000.0)
    whole = throughput_report(tiny_model, 1, preflight, memory, torch.device("cuda"), steps=1000, seconds=10.0)
    assert whole["kv_read_fraction"] == 1.0 and whole["bytes_per_frame"] == pytest.approx(3.6e9)


def test_the_driver_reports_the_fraction_of_the_ring_its_steps_read(tiny_model, make_codes, monkeypatch):
    """tiny (ring 16 in frame mode, buckets 1..15 then the whole ring), T = 40: the steps attend 1, 2, ..., 15, then
    16 for the 25 others: (120 + 25 * 16) / (40 * 16)."""
    from fused_stream.core.config import EvalConfig
    from fused_stream.engine.driver import StreamingEvaluator

    codes = make_codes(tiny_model, [40], seed=3)
    evaluator = StreamingEvaluator(tiny_model, EvalConfig(verify=False))
    seen = {}
    real = throughput_report

    def spy(*args, **kwargs):
        seen["fraction"] = kwargs.get("kv_read_fraction")
        return real(*args, **kwargs)

    import fused_stream.engine.driver as driver

    monkeypatch.setattr(driver, "throughput_report", spy)
    evaluator.evaluate(codes)
    assert seen["fraction"] == pytest.approx((sum(range(1, 16)) + 25 * 16) / (40 * 16))
