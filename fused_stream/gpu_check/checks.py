"""The checks of `python -m fused_stream.gpu_check`, one function each, in the order they run (`CHECKS`).

Each takes the run's `Context` and its budget in seconds and returns (one-line detail, data for the JSON); it raises
`CheckSkipped` when it cannot run here (no CUDA) and anything else when it fails.
"""

from __future__ import annotations

import gc
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.config import EvalConfig
from ..core.driver import StreamingEvaluator
from ..data.codes import generate_codes
from ..data.models import load_model
from ..kernels import cross_entropy as ce
from ..measure.throughput import gpu_spec

SKIP_NO_CUDA = "skipped: no CUDA"


class CheckSkipped(Exception):
    """A check that cannot run here (no CUDA, out of time): recorded as skipped, not failed."""


class CheckTimeout(Exception):
    """A check ran past its budget."""


@dataclass
class Context:
    dry_run: bool
    cuda: bool
    env: dict[str, str]  # for subprocesses: PYTHONPATH with the installed wheels
    work: Path  # scratch space for the subprocesses' outputs
    repo: Path  # where tests/ lives (pytest -m gpu runs there)
    cache: dict[str, Any] = field(default_factory=dict)  # models shared between checks


def free_cuda() -> None:
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _needs_cuda(ctx: Context) -> None:
    if not ctx.cuda:
        raise CheckSkipped(SKIP_NO_CUDA)


def _subprocess(ctx: Context, args: list[str], budget: float, log: str) -> subprocess.CompletedProcess:
    """Run `python args...` with the wheels' PYTHONPATH; its output goes to work/<log>; a non-zero exit raises."""
    path = ctx.work / log
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ctx.repo, env=ctx.env, capture_output=True, text=True,
                              timeout=budget)
    except subprocess.TimeoutExpired as exc:
        raise CheckTimeout(f"`{' '.join(args[:4])} ...` ran past its budget of {budget:.0f} s") from exc
    path.write_text(f"$ python {' '.join(args)}\n[exit {proc.returncode}]\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"exit status {proc.returncode}: {' | '.join(tail)[-400:]} (log {path})")
    return proc


# --- the checks -------------------------------------------------------------------------------------------------------

_CAPTURE_CASE = """
import torch
from fused_stream import EvalConfig, StreamingEvaluator, load_model
from fused_stream.data.codes import generate_codes
model = load_model("tiny", device="cuda", seed=0)
codes = generate_codes(model, 2, 8, seed=0)
result = StreamingEvaluator(model, EvalConfig(chunk_size=4, cuda_graphs="on")).evaluate(codes)
graphs = result.report["cuda_graphs"]
assert bool(result.valid.any()), "no position scored"
assert torch.isfinite(result.losses[result.valid]).all(), "non-finite loss"
print("graphs:", graphs.get("reason"))
"""


def check_capture_short_batch(ctx: Context, budget: float) -> tuple[str, dict]:
    _needs_cuda(ctx)
    proc = _subprocess(ctx, ["-c", _CAPTURE_CASE], budget, "a_capture_short_batch.log")
    reason = next((line[8:] for line in proc.stdout.splitlines() if line.startswith("graphs: ")), "")
    return f"tiny T=8 C=4 graphs on, own process: ok ({reason})", {"graphs": reason}


def check_pytest_gpu(ctx: Context, budget: float) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ctx.repo, env=ctx.env, capture_output=True, text=True, timeout=budget)
    (ctx.work / "b_pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    summary = next((line.strip("= ") for line in reversed(proc.stdout.splitlines()) if line.strip()), "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)",
                                                      summary)}
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exit status {proc.returncode}: {summary}")
    if ctx.cuda and counts.get("passed", 0) == 0:
        raise RuntimeError(f"pytest -m gpu passed nothing on a CUDA machine: {summary}")
    return summary, counts


def _model(ctx: Context, preset: str, **kwargs: Any):
    if preset not in ctx.cache:
        ctx.cache.clear()  # one model at a time: moshi-7b and another do not need to share the card
        free_cuda()
        device = "cuda" if ctx.cuda else "cpu"
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        ctx.cache[preset] = load_model(preset, device=device, dtype=dtype, seed=0, **kwargs)
    return ctx.cache[preset]


def check_graph_vs_eager_bits(ctx: Context, budget: float) -> tuple[str, dict]:
    _needs_cuda(ctx)
    model = _model(ctx, "small")
    codes = generate_codes(model, 2, 256, seed=0)
    graphed = StreamingEvaluator(model, EvalConfig(cuda_graphs="on", verify_graph=200)).evaluate(codes)
    eager = StreamingEvaluator(model, EvalConfig(cuda_graphs="off")).evaluate(codes)
    same = all(torch.equal(a, b) for a, b in ((graphed.losses, eager.losses), (graphed.valid, eager.valid),
                                              (graphed.text_losses, eager.text_losses)))
    # NaN != NaN for torch.equal: compare the bits where a loss is NaN (masked) too
    bits = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in ((graphed.losses, eager.losses), (graphed.text_losses, eager.text_losses)))
    if not (same or bits):
        diff = (graphed.losses - eager.losses).abs().nan_to_num(0).max().item()
        raise AssertionError(f"graphed and eager losses differ (max |diff| {diff:.3g})")
    return "small bf16: 200 replays == 200 eager calls, and a graphed run == an eager run, bit for bit", {
        "frames": int(codes.shape[0] * codes.shape[-1]), "graphs": graphed.report["cuda_graphs"].get("reason")}


def check_memory_flat(ctx: Context, budget: float) -> tuple[str, dict]:
    # the GPU: frame mode (the deployment semantics); the CPU dry run: chunks of 8, to stay within seconds
    preset, batch, frames, chunk = ("small", 8, 2560, 1) if ctx.cuda else ("tiny", 2, 160, 8)
    model = _model(ctx, preset)
    codes = generate_codes(model, batch, frames, seed=0)
    config = EvalConfig(chunk_size=chunk, assert_constant_memory=True, monitor_interval=0.02)
    result = StreamingEvaluator(model, config).evaluate(codes)
    memory = result.report["memory"]
    data = {key: memory.get(key) for key in ("memory_source", "constant_memory", "peak_bytes", "implied_growth_bytes",
                                            "tolerance_bytes", "samples")} | {"frames": batch * frames}
    if ctx.cuda and memory.get("memory_source") != "nvml":
        raise AssertionError(f"memory read from {memory.get('memory_source')!r}, not nvml: "
                             f"{memory.get('memory_source_reason')}")
    if ctx.cuda and memory.get("constant_memory") is not True:
        raise AssertionError(f"constant memory not shown: {memory.get('constant_memory')} ({memory.get('reason')})")
    return (f"{preset}: {batch * frames:,} frames, memory {memory.get('memory_source')}, "
            f"constant: {memory.get('constant_memory')}"), data


def check_moshi7b_cli(ctx: Context, budget: float) -> tuple[str, dict]:
    out = ctx.work / "e_cli_out"
    if ctx.cuda:
        args = ["--model", "moshi-7b", "--generate", "2", "--frames", "600"]
    else:
        args = ["--model", "tiny", "--generate", "2", "--frames", "60", "--device", "cpu"]
    _subprocess(ctx, ["-m", "fused_stream.eval", *args, "--verify", "--out", str(out)], budget, "e_cli.log")
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*.json"))
    if not found:
        raise AssertionError(f"the CLI wrote no JSON under {out}")
    model = "moshi-7b" if ctx.cuda else "tiny (dry run)"
    return f"{model} --generate 2 --frames {args[5]} --verify: exit 0", {"outputs": found[:10]}


def check_loss_kernel(ctx: Context, budget: float) -> tuple[str, dict]:
    device = torch.device("cuda" if ctx.cuda else "cpu")
    spec = gpu_spec(torch.cuda.get_device_name(device)) if ctx.cuda else None
    shapes = [(8, 1), (8, 64)] if ctx.cuda else [(2, 1), (2, 4)]
    rows, parts = [], []
    backend = "triton" if ctx.cuda else "torch"
    for B, C in shapes:
        args = loss_step_inputs(B, C, device, small=not ctx.cuda)
        fused = _time(lambda args=args: ce.step_cross_entropy_(*args, lead=1, backend=backend), device)
        plain = _time(lambda args=args: plain_torch_step(*args, lead=1), device)
        logit_bytes = args[0].numel() * args[0].element_size() + args[1].numel() * args[1].element_size()
        row = {"B": B, "C": C, "backend": backend, "logit_bytes": logit_bytes, "fused_s": fused, "plain_s": plain,
               "fused_GB_per_s": logit_bytes / fused / 1e9, "plain_GB_per_s": logit_bytes / plain / 1e9}
        if spec is not None:
            row["fused_hbm_fraction"] = logit_bytes / fused / spec.hbm_bytes_per_s
            row["plain_hbm_fraction"] = logit_bytes / plain / spec.hbm_bytes_per_s
        rows.append(row)
        pct = f" = {100 * row['fused_hbm_fraction']:.0f} % HBM" if spec else ""
        parts.append(f"C={C}: {row['fused_GB_per_s']:.3g} GB/s{pct} vs plain {row['plain_GB_per_s']:.3g} GB/s")
    where = spec.name if spec else "no bandwidth table for the CPU"
    return f"B={shapes[0][0]} " + "; ".join(parts) + f" ({where})", {"rows": rows, "gpu": spec and spec.name}


def loss_step_inputs(B: int, C: int, device: Any, small: bool) -> tuple:
    """One step's logits, targets and buffers at Moshi's vocabularies (the CPU dry run: small vocabularies)."""
    dep_q, card, text_card = (8, 64, 96) if small else (8, 2048, 32000)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    text = torch.randn(B, 1, C, text_card, generator=g, device=device).to(dtype)
    audio = torch.randn(B, dep_q, C, card, generator=g, device=device).to(dtype)
    targets = torch.randint(0, card, (B, 1 + dep_q, C), generator=g, device=device)
    delays = torch.tensor([0, 0] + [1] * (dep_q - 1), device=device)
    lengths = torch.full((B,), 10_000, device=device)
    offset = torch.tensor(5, device=device)
    out = torch.full((B, 1 + dep_q, 1 + 10_000), float("nan"), device=device)
    counts = torch.zeros(ce.N_COUNTERS, dtype=torch.long, device=device)
    return text, audio, targets, delays, lengths, offset, out, counts


def plain_torch_step(text, audio, targets, delays, lengths, offset, out, counts, lead: int) -> None:
    """What a user writes: F.cross_entropy(x.float()) per stream, a mask, an index write: the baseline of the loss
    kernel here and in bench/test_kernel_bench.py."""
    C = audio.shape[2]
    step = offset + torch.arange(C, device=out.device)
    t = step.view(1, 1, C) - delays.view(1, -1, 1)
    losses = []
    for logits, tgt in ((text, targets[:, :1]), (audio, targets[:, 1:])):
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.float().reshape(-1, V), tgt.clamp(0, V - 1).reshape(-1), reduction="none")
        losses.append(loss.view(tgt.shape))
    loss = torch.cat(losses, dim=1)
    valid = (t >= 0) & (step.view(1, 1, C) < lengths.view(-1, 1, 1)) & (targets >= 0)
    out.scatter_(2, (lead + t).expand_as(loss), torch.where(valid, loss, torch.full_like(loss, float("nan"))))


def _time(fn: Callable[[], None], device: Any, rounds: int = 20) -> float:
    """Median seconds of one call, after a warm-up call (compilation, allocator)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(rounds if device.type == "cuda" else 3):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_throughput(ctx: Context, budget: float) -> tuple[str, dict]:
    preset, frames = ("moshi-7b", 300) if ctx.cuda else ("tiny", 16)
    model = _model(ctx, preset)
    cases = [("frame_B1", 1, 1), ("frame_B8", 8, 1), ("chunk_C64_B1", 1, 64)]
    rows: dict[str, dict] = {}
    parts = []
    for name, batch, chunk in cases:
        codes = generate_codes(model, batch, frames, seed=0)
        for graphs in ("off", "on"):
            key = f"{'graphed' if graphs == 'on' else 'eager'}_{name}"
            if graphs == "on" and not ctx.cuda:
                rows[key] = {"skipped": SKIP_NO_CUDA}
                continue
            config = EvalConfig(chunk_size=chunk, batch_size=batch, cuda_graphs=graphs, monitor_interval=0.02)
            report = StreamingEvaluator(model, config).evaluate(codes).report
            tp = report["throughput"]
            rows[key] = {k: tp.get(k) for k in ("headline_frames_per_second", "headline", "steady_frames_per_second",
                                                "overall_frames_per_second", "roofline_ratio", "mfu", "gpu",
                                                "bound_reason")} | {"frames_per_second": report["frames_per_second"]}
    for name, _, _ in cases:
        eager, graphed = rows[f"eager_{name}"], rows[f"graphed_{name}"]
        rate = graphed.get("headline_frames_per_second") or eager.get("headline_frames_per_second")
        text = f"{name} {rate or 0:,.0f} f/s"
        if graphed.get("headline_frames_per_second") and eager.get("headline_frames_per_second"):
            text += f" ({graphed['headline_frames_per_second'] / eager['headline_frames_per_second']:.2f}x eager)"
        bound = graphed if "skipped" not in graphed else eager
        if bound.get("roofline_ratio") is not None:
            text += f" roofline {100 * bound['roofline_ratio']:.0f} %"
        if bound.get("mfu") is not None:
            text += f" MFU {100 * bound['mfu']:.1f} %"
        parts.append(text)
    suffix = "" if ctx.cuda else f"; graphed: {SKIP_NO_CUDA}"
    return f"{preset} T={frames}, steady rates: " + "; ".join(parts) + suffix, {"preset": preset, "frames": frames,
                                                                              "rows": rows}


CHECKS: list[tuple[str, Callable[[Context, float], tuple[str, dict]], float]] = [
    ("a_capture_short_batch", check_capture_short_batch, 60.0),
    ("b_pytest_gpu", check_pytest_gpu, 150.0),
    ("c_graph_vs_eager_bits", check_graph_vs_eager_bits, 60.0),
    ("d_memory_flat_nvml", check_memory_flat, 60.0),
    ("e_moshi7b_cli_verify", check_moshi7b_cli, 150.0),
    ("f_loss_kernel_bandwidth", check_loss_kernel, 30.0),
    ("g_throughput", check_throughput, 120.0),
]
