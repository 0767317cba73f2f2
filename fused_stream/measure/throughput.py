"""Throughput of a streaming run, and how far it is from the GPU's limits (roofline for frame mode, MFU for chunks).

Frame mode is memory-bound: each step reads every weight once for the B frames of the batch and, of each
sequence's KV cache, the ring slots it attends (the filled ones, rounded up to a fill bucket: `kv_read_fraction`
of the ring, averaged over the run's steps; the whole ring when not given), so frames/s <= HBM bandwidth /
(weights / B + KV bytes read per sequence). Chunk mode is
compute-bound: about 2 FLOPs per parameter per frame, plus attention over the context. Both bounds use the
vendor's numbers for known GPUs only (`gpu_spec`); on an unknown GPU or the CPU the ratio is omitted, with
the reason, never guessed.

The headline rate is the steady one (`headline_frames_per_second`, labelled by `headline`): frames/s after the
monitor's warm-up, which leaves out stream opening, CUDA-graph capture and compilation. `overall_frames_per_second`
beside it is frames / the run's wall time, setup included; a run too short for a steady window falls back to the
monitor's rate over all its samples, and `headline` says so. The roofline ratio and MFU use the headline rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMModel


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float
    bf16_dense_flops: float  # dense tensor-core BF16 (the datasheets' "with sparsity" figure halved)


# Vendor datasheet values: NVIDIA H100 Tensor Core GPU datasheet (SXM / PCIe / NVL columns), NVIDIA H200 datasheet
# (SXM / NVL), NVIDIA A100 datasheet (40GB, 80GB PCIe, 80GB SXM). Patterns are matched against
# torch.cuda.get_device_name() case-insensitively, most specific first; word boundaries keep "GH200" from matching
# H200. A name that matches none gets None: an unknown card's bound is never guessed.
_GPU_SPECS: tuple[tuple[str, GpuSpec], ...] = (
    (r"\bH100 NVL\b", GpuSpec("H100 NVL", 3.9e12, 835e12)),
    (r"\bH100\b.*\bPCIe\b", GpuSpec("H100 PCIe", 2.0e12, 756e12)),
    (r"\bH100\b.*\b(80GB HBM3|SXM)", GpuSpec("H100 SXM", 3.35e12, 989e12)),
    (r"\bH200 NVL\b", GpuSpec("H200 NVL", 4.8e12, 835e12)),
    (r"\bH200\b", GpuSpec("H200", 4.8e12, 989e12)),
    (r"\bA100\b.*\bSXM4?\b.*\b80GB\b", GpuSpec("A100 SXM4 80GB", 2.039e12, 312e12)),
    (r"\bA100\b.*(\bPCIe\b.*\b80GB\b|\b80GB\b.*\bPCIe\b)", GpuSpec("A100 PCIe 80GB", 1.935e12, 312e12)),
    (r"\bA100\b.*\b40GB\b", GpuSpec("A100 40GB", 1.555e12, 312e12)),
)


def gpu_spec(device_name: str) -> GpuSpec | None:
    """HBM bandwidth and dense BF16 peak of a known GPU, by its torch device name; None if unknown."""
    # torch names use "-" as a separator in some models ("NVIDIA A100-SXM4-80GB"): treat it as a space.
    name = device_name.replace("-", " ")
    for pattern, spec in _GPU_SPECS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return spec
    return None


def frame_roofline(weight_bytes: float, kv_bytes_per_sequence: float, batch_size: int, hbm_bytes_per_s: float) -> float:
    """Upper bound on frames/s in frame mode, which is HBM-bound.

    Each step reads every weight once for its B frames and each sequence's KV cache once, so
    bytes per frame = weight_bytes / B + kv_bytes_per_sequence and frames/s <= bandwidth / bytes per frame.
    """
    if batch_size < 1 or hbm_bytes_per_s <= 0:
        raise ValueError(f"need batch_size >= 1 and hbm_bytes_per_s > 0, got {batch_size}, {hbm_bytes_per_s}")
    return hbm_bytes_per_s / (weight_bytes / batch_size + kv_bytes_per_sequence)


def chunk_mfu(frames_per_second: float, flops_per_frame: float, peak_flops: float) -> float:
    """Model FLOP utilisation of chunk mode (compute-bound): achieved FLOP/s over the GPU's peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return frames_per_second * flops_per_frame / peak_flops


def flops_per_frame(model: LMModel) -> float:
    """Forward FLOPs per frame in steady state: 2 per non-embedding weight, plus attention over the full context.

    Embedding tables are lookups (no FLOPs). Attention: QK^T and AV, 2 FLOPs per multiply-add, over `context` keys
    in every temporal layer; the depformer attends over at most dep_q positions, negligible.
    """
    weights = sum(p.numel() for name, p in model.named_parameters() if "emb" not in name.split(".")[0])
    layers = len(model.transformer.layers)
    return 2.0 * weights + 4.0 * layers * model.dim * model.context


def throughput_report(
    model: LMModel,
    chunk_size: int,
    preflight: dict[str, Any],
    memory: dict[str, Any],
    device: torch.device,
    steps: int,
    seconds: float,
    kv_read_fraction: float | None = None,
) -> dict[str, Any]:
    """frames/s overall and steady (from the monitor), steps/s, and the roofline ratio (C = 1) or MFU (C > 1).

    `kv_read_fraction`: the mean fraction of each sequence's KV ring a step reads (None: all of it)."""
    frames = memory.get("frames")
    out: dict[str, Any] = {
        "frames_per_second": memory.get("frames_per_second"),
        "steady_frames_per_second": memory.get("steady_frames_per_second"),
        "overall_frames_per_second": frames / seconds if frames and seconds > 0 else None,
        "steps_per_second": steps / seconds if seconds > 0 else None,
    }
    out["headline_frames_per_second"], out["headline"] = headline_rate(out)
    measured = out["headline_frames_per_second"]
    spec = gpu_spec(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if spec is None:
        out["bound_reason"] = f"no bandwidth/FLOPs table entry for {_device_name(device)}"
        return out
    out["gpu"] = spec.name
    if chunk_size == 1:
        estimate, batch = preflight["estimate"], preflight["batch_size"]
        fraction = 1.0 if kv_read_fraction is None else kv_read_fraction
        kv_read = estimate["kv_cache"] / batch * fraction
        bound = frame_roofline(estimate["weights"], kv_read, batch, spec.hbm_bytes_per_s)
        out["kv_read_fraction"] = fraction
        out["bytes_per_frame"] = estimate["weights"] / batch + kv_read
        out["roofline_frames_per_second"] = bound
        out["roofline_ratio"] = measured / bound if measured else None
    else:
        per_frame = flops_per_frame(model)
        out["flops_per_frame"] = per_frame
        out["mfu"] = chunk_mfu(measured, per_frame, spec.bf16_dense_flops) if measured else None
        out["mfu_peak"] = "dense bf16"  # an fp32 run is measured against the bf16 peak too: compare like with like
    return out


def headline_rate(throughput: dict[str, Any]) -> tuple[float | None, str]:
    """The rate to show first, and its label: steady (after warm-up) if measured, else the monitor's overall one."""
    steady = throughput.get("steady_frames_per_second")
    if steady:
        return steady, "steady"
    fallback = throughput.get("frames_per_second")
    return (fallback, "overall (too short for a steady window)") if fallback else (None, "not measured")


def format_throughput(throughput: dict[str, Any]) -> str:
    """One line for people: the headline rate first, the overall one (setup included) beside it, labelled."""
    rate, label = throughput.get("headline_frames_per_second"), throughput.get("headline")
    if rate is None and label is None:
        rate, label = headline_rate(throughput)
    overall = throughput.get("overall_frames_per_second")
    head = f"{rate:,.1f} frames/s {label}" if rate else "frames/s not measured"
    tail = f"; {overall:,.1f} frames/s overall incl. setup" if overall else ""
    extra = ""
    if throughput.get("roofline_ratio") is not None:
        extra = f"; {100 * throughput['roofline_ratio']:.1f} % of the {throughput.get('gpu')} roofline"
    elif throughput.get("mfu") is not None:
        extra = f"; MFU {100 * throughput['mfu']:.1f} % ({throughput.get('gpu')}, {throughput.get('mfu_peak')})"
    return head + tail + extra


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
