"""The checks of `python -m fused_stream.gpu_check`, one function each, in the order they run (`CHECKS`).

Each takes the run's `Context` and its budget in seconds and returns (one-line detail, data for the JSON); it raises
`CheckSkipped` when it cannot run here and anything else when it fails. They run in one process and share what is
expensive: one model at a time in `Context.cache` (`small` for b and c, `moshi-7b` for e and f, each built once),
and the kernels compiled by the first check that runs them (moshi's torch.compile, Triton). Only a (a device-side
assert kills the process that hits it) and g (pytest) run in subprocesses, sharing the on-disk compile caches.
On the CPU (`--dry-run`) every check runs the same code with tiny sizes and `cuda_graphs="rehearse"` where the
GPU captures: the control flow, ring wrap included, not the speed.
"""

from __future__ import annotations

import bisect
import gc
import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import EvalConfig
from ..data.codes import generate_codes
from ..data.models import load_model
from ..engine.driver import StreamingEvaluator
from ..kernels import backends
from ..measure.throughput import flops_per_frame, gpu_spec
from ..patches.ring_attention import fill_buckets
from .kernel_timing import loss_step_inputs, plain_torch_step, time_per_call  # noqa: F401 - the bench imports them here

SKIP_NO_CUDA = "skipped: no CUDA"


class CheckSkipped(Exception):
    """A check that cannot run here (no CUDA, out of time): recorded as skipped, not failed."""


class CheckTimeout(Exception):
    """A check ran past its budget."""


@dataclass
class Context:
    dry_run: bool
    cuda: bool
    env: dict[str, str]  # for subprocesses: PYTHONPATH with the installed wheels, the shared compile caches
    work: Path  # scratch space for the subprocesses' outputs
    repo: Path  # where tests/ lives (pytest -m gpu runs there)
    cache: dict[str, Any] = field(default_factory=dict)  # the one model shared between checks

    @property
    def graphs(self) -> str:
        """What the GPU captures, the CPU rehearses."""
        return "on" if self.cuda else "rehearse"


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _subprocess(ctx: Context, args: list[str], budget: float, log: str) -> subprocess.CompletedProcess:
    """Run `python args...` with the run's environment; its output goes to work/<log>; a non-zero exit raises."""
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


def _model(ctx: Context, preset: str):
    """The shared model: built once, dropped (and the card emptied) only when another preset is wanted."""
    if preset not in ctx.cache:
        ctx.cache.clear()
        free_cuda()
        device = "cuda" if ctx.cuda else "cpu"
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        ctx.cache[preset] = load_model(preset, device=device, dtype=dtype, seed=0)
    return ctx.cache[preset]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))  # NaN == NaN by bits


# --- a: a short batch captured, in its own process -------------------------------------------------------------------

_CAPTURE_CASE = """
import sys, torch
from fused_stream import EvalConfig, StreamingEvaluator, load_model
from fused_stream.data.codes import generate_codes
device, graphs = sys.argv[1], sys.argv[2]
model = load_model("tiny", device=device, seed=0)
codes = generate_codes(model, 2, 8, seed=0)
result = StreamingEvaluator(model, EvalConfig(chunk_size=4, cuda_graphs=graphs)).evaluate(codes)
assert bool(result.valid.any()), "no position scored"
assert torch.isfinite(result.losses[result.valid]).all(), "non-finite loss"
print("graphs:", result.report["cuda_graphs"].get("reason"))
"""


def check_capture_short_batch(ctx: Context, budget: float) -> tuple[str, dict]:
    device = "cuda" if ctx.cuda else "cpu"
    proc = _subprocess(ctx, ["-c", _CAPTURE_CASE, device, ctx.graphs], budget, "a_capture_short_batch.log")
    reason = next((line[8:] for line in proc.stdout.splitlines() if line.startswith("graphs: ")), "")
    return f"tiny T=8 C=4 cuda_graphs={ctx.graphs}, own process: ok ({reason})", {"graphs": reason}


# --- b: graph == eager, bit for bit, past the ring's wrap, every bucket's graph replayed ----------------------------


def wrap_frames(ring: int, chunk: int) -> int:
    """Frames of a batch that reaches past every fill bucket of a ring of `ring` slots and wraps it."""
    return math.ceil((ring + 8 * chunk) / chunk) * chunk


def bucket_calls(ring: int, frames: int, chunk: int) -> list[int]:
    """Calls of each fill bucket for one batch of `frames` (as `RingSteps` picks them), from the host arithmetic."""
    buckets = fill_buckets(ring, frames, chunk)
    counts = [0] * len(buckets)
    for call in range(frames // chunk):
        index = bisect.bisect_left(buckets, (call + 1) * chunk, key=lambda b: math.inf if b is None else b)
        counts[min(index, len(buckets) - 1)] += 1
    return counts


def check_graph_vs_eager_bits(ctx: Context, budget: float) -> tuple[str, dict]:
    model = _model(ctx, "small" if ctx.cuda else "tiny")
    rows, parts = [], []
    for chunk in (1, 8):
        ring = model.context + chunk - 1
        frames = wrap_frames(ring, chunk)
        calls = bucket_calls(ring, frames, chunk)
        if 0 in calls:
            raise AssertionError(f"C={chunk}, T={frames}: a fill bucket would not be replayed ({calls})")
        codes = generate_codes(model, 2, [frames, frames - 3], seed=chunk)
        common = {"chunk_size": chunk, "batch_size": 2, "verify": False}
        # verify_graph past the batch: every call replayed and compared with an eager call from the same start
        graphed = StreamingEvaluator(model, EvalConfig(cuda_graphs=ctx.graphs, verify_graph=10**9, **common))
        result = graphed.evaluate(codes)
        graphs = result.report["cuda_graphs"]
        if not (graphs["graphed"] or graphs["rehearsed"]):
            raise AssertionError(f"C={chunk}: not captured: {graphs['reason']}")
        # A separate eager run (cuda_graphs="off") must equal the graphed run too. At C = 1 its 3000+ eager steps
        # would repeat what the call-by-call comparison above already ran (the same eager calls): C = 8 only.
        separate = chunk > 1 or not ctx.cuda
        if separate:
            eager = StreamingEvaluator(model, EvalConfig(cuda_graphs="off", **common)).evaluate(codes)
            for name in ("losses", "text_losses", "valid"):
                if not _same_bits(getattr(result, name).float(), getattr(eager, name).float()):
                    diff = (result.losses - eager.losses).abs().nan_to_num(0).max().item()
                    raise AssertionError(f"C={chunk}: a graphed run and an eager run differ in {name} "
                                         f"(max |diff| {diff:.3g})")
        rows.append({"chunk": chunk, "frames": frames, "ring": ring, "buckets": len(calls), "bucket_calls": calls,
                     "verified_calls": graphs["verified_calls"], "graphs": graphs["reason"],
                     "separate_eager_run_equal": separate})
        parts.append(f"C={chunk}: T={frames} > ring {ring}, {len(calls)} buckets, {graphs['verified_calls']} calls"
                     + (", == a separate eager run" if separate else ""))
    preset = "small bf16" if ctx.cuda else "tiny (rehearsed)"
    return (f"{preset}: past the wrap, every call (every bucket's graph) replayed == an eager call, bit for bit; "
            + "; ".join(parts)), {"rows": rows}


# --- c: memory flat over 20k frames, read by NVML ------------------------------------------------------------------


def check_memory_flat(ctx: Context, budget: float) -> tuple[str, dict]:
    # the GPU: frame mode (the deployment semantics); the CPU dry run: chunks of 8, to stay within seconds
    preset, batch, frames, chunk = ("small", 8, 2560, 1) if ctx.cuda else ("tiny", 2, 160, 8)
    model = _model(ctx, preset)
    codes = generate_codes(model, batch, frames, seed=0)
    config = EvalConfig(chunk_size=chunk, batch_size=batch, assert_constant_memory=True, monitor_interval=0.02,
                        verify=False)
    memory = StreamingEvaluator(model, config).evaluate(codes).report["memory"]
    data = {key: memory.get(key) for key in ("memory_source", "constant_memory", "peak_bytes", "implied_growth_bytes",
                                            "tolerance_bytes", "samples")} | {"frames": batch * frames}
    if ctx.cuda and memory.get("memory_source") != "nvml":
        raise AssertionError(f"memory read from {memory.get('memory_source')!r}, not nvml: "
                             f"{memory.get('memory_source_reason')}")
    if ctx.cuda and memory.get("constant_memory") is not True:
        raise AssertionError(f"constant memory not shown: {memory.get('constant_memory')} ({memory.get('reason')})")
    return (f"{preset}: {batch * frames:,} frames, memory {memory.get('memory_source')}, "
            f"constant: {memory.get('constant_memory')}"), data


# --- d: the loss kernel's bandwidth ---------------------------------------------------------------------------------


def check_loss_kernel(ctx: Context, budget: float) -> tuple[str, dict]:
    device = torch.device("cuda" if ctx.cuda else "cpu")
    spec = gpu_spec(torch.cuda.get_device_name(device)) if ctx.cuda else None
    shapes = [(8, 1), (8, 64)] if ctx.cuda else [(2, 1), (2, 4)]
    rows, parts = [], []
    backend = "triton" if ctx.cuda else "torch"
    for B, C in shapes:
        args = loss_step_inputs(B, C, device, small=not ctx.cuda)
        fused, calls = time_per_call(
            lambda args=args: backends.step_cross_entropy_(*args, lead=1, backend=backend), device)
        plain, _ = time_per_call(lambda args=args: plain_torch_step(*args, lead=1), device)
        logit_bytes = args[0].numel() * args[0].element_size() + args[1].numel() * args[1].element_size()
        row = {"B": B, "C": C, "backend": backend, "logit_bytes": logit_bytes, "fused_s": fused, "plain_s": plain,
               "calls_timed": calls, "fused_GB_per_s": logit_bytes / fused / 1e9,
               "plain_GB_per_s": logit_bytes / plain / 1e9}
        if spec is not None:
            row["fused_hbm_fraction"] = logit_bytes / fused / spec.hbm_bytes_per_s
            row["plain_hbm_fraction"] = logit_bytes / plain / spec.hbm_bytes_per_s
        rows.append(row)
        pct = f" = {100 * row['fused_hbm_fraction']:.0f} % HBM" if spec else ""
        parts.append(f"C={C}: {row['fused_GB_per_s']:.3g} GB/s{pct} vs plain {row['plain_GB_per_s']:.3g} GB/s")
    where = spec.name if spec else "no bandwidth table for the CPU"
    timing = "CUDA events" if ctx.cuda else "wall clock"
    return (f"B={shapes[0][0]} " + "; ".join(parts) + f" ({where}; {timing} over >= 0.1 s of calls)",
            {"rows": rows, "gpu": spec and spec.name})


# --- e: moshi-7b end to end with the verification ------------------------------------------------------------------


def check_moshi7b_verify(ctx: Context, budget: float) -> tuple[str, dict]:
    preset, frames = ("moshi-7b", 600) if ctx.cuda else ("tiny", 60)
    model = _model(ctx, preset)
    codes = generate_codes(model, 2, frames, seed=1)
    graphs = "auto" if ctx.cuda else ctx.graphs  # the default on CUDA: captured
    result = StreamingEvaluator(model, EvalConfig(verify=True, cuda_graphs=graphs)).evaluate(codes)
    report = result.report
    verification, graphs = report["verification"], report["cuda_graphs"]
    if not verification.get("passed"):
        raise AssertionError(f"verification did not pass: {verification}")
    if not (graphs["graphed"] or graphs["rehearsed"]):
        raise AssertionError(f"not graphed: {graphs['reason']}")
    if not bool(result.valid.any()) or not torch.isfinite(result.losses[result.valid]).all():
        raise AssertionError("no finite loss scored")
    data = {"verification": verification, "cuda_graphs": graphs, "batch_size": report["batch_size"],
            "mean_losses": result.mean_losses()}
    return (f"{preset} B=2 T={frames}: verified against LMModel.forward (max |diff| "
            f"{verification.get('max_abs_diff'):.3g} <= {verification.get('tolerance')}), graphs: "
            f"{graphs['reason']}"), data


# --- f: throughput, graphed vs eager, set-up left out ----------------------------------------------------------------


def check_throughput(ctx: Context, budget: float) -> tuple[str, dict]:
    preset = "moshi-7b" if ctx.cuda else "tiny"
    model = _model(ctx, preset)
    spec = gpu_spec(torch.cuda.get_device_name()) if ctx.cuda else None
    # (name, B, C, frames): frame mode long enough for a few hundred steps; chunk mode for 40 calls
    cases = ([("frame_B1", 1, 1, 400), ("frame_B8", 8, 1, 400), ("chunk_C64_B1", 1, 64, 2560)] if ctx.cuda
             else [("frame_B1", 1, 1, 24), ("frame_B8", 8, 1, 24), ("chunk_C64_B1", 1, 64, 128)])
    rows: dict[str, dict] = {}
    parts = []
    for name, batch, chunk, frames in cases:
        codes = generate_codes(model, batch, frames, seed=0)
        for graphs in ("off", ctx.graphs):
            config = EvalConfig(chunk_size=chunk, batch_size=batch, cuda_graphs=graphs, verify=False,
                                monitor_interval=0.05)
            if graphs == "off":  # compile (moshi's torch.compile, Triton) outside the timed run
                StreamingEvaluator(model, config).evaluate(codes[..., : 2 * chunk])
            report = StreamingEvaluator(model, config).evaluate(codes).report
            rows[f"{'eager' if graphs == 'off' else 'graphed'}_{name}"] = _rates(report, model, batch, chunk, spec)
        eager, graphed = rows[f"eager_{name}"], rows[f"graphed_{name}"]
        speedup = graphed["frames_per_second"] / eager["frames_per_second"]
        text = f"{name} {graphed['frames_per_second']:,.0f} f/s ({speedup:.2f}x eager)"
        if graphed.get("roofline_ratio") is not None:
            text += f" roofline {100 * graphed['roofline_ratio']:.0f} %"
        if graphed.get("mfu") is not None:
            text += f" MFU {100 * graphed['mfu']:.1f} %"
        parts.append(text)
    label = "graphed" if ctx.cuda else "rehearsed (no speed meaning on the CPU)"
    return (f"{preset}, {label}, rates over the batch loop only (capture and compilation left out): "
            + "; ".join(parts)), {"preset": preset, "rows": rows}


def _rates(report: dict, model: Any, batch: int, chunk: int, spec: Any) -> dict[str, Any]:
    """frames/s over the batch loop's wall time (ended by the host copy that waits for the last step), set-up out;
    the roofline ratio (frame mode, the bytes the steps read) or MFU (chunk mode) of that rate."""
    graphs, tp = report["cuda_graphs"], report["throughput"]
    loop = graphs["graphed_seconds"] + graphs["eager_seconds"]
    rate = report["frames"] / loop if loop > 0 else float("nan")
    row = {"frames_per_second": rate, "loop_seconds": loop, "capture_seconds": graphs["capture_seconds"],
           "run_seconds": report["seconds"], "graphs": graphs["reason"], "frames": report["frames"],
           "kv_read_fraction": tp.get("kv_read_fraction"), "bytes_per_frame": tp.get("bytes_per_frame")}
    if spec is not None and chunk == 1 and tp.get("roofline_frames_per_second"):
        row["roofline_ratio"] = rate / tp["roofline_frames_per_second"]
    if spec is not None and chunk > 1:
        row["mfu"] = rate * flops_per_frame(model) / spec.bf16_dense_flops
    return row


# --- g: the test suite's GPU tests ---------------------------------------------------------------------------------


def check_pytest_gpu(ctx: Context, budget: float) -> tuple[str, dict]:
    ctx.cache.clear()  # its own process needs the card
    free_cuda()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=ctx.repo, env=ctx.env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as exc:
        raise CheckTimeout(f"pytest -m gpu ran past its budget of {budget:.0f} s") from exc
    (ctx.work / "g_pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    summary = next((line.strip("= ") for line in reversed(proc.stdout.splitlines()) if line.strip()), "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)",
                                                      summary)}
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exit status {proc.returncode}: {summary}")
    if ctx.cuda and counts.get("passed", 0) == 0:
        raise RuntimeError(f"pytest -m gpu passed nothing on a CUDA machine: {summary}")
    return summary, counts


# (name, function, budget in seconds on one H100/H200): the budgets add up to run.DEFAULT_BUDGET_S, which with the
# start-up (imports, bootstrap) keeps the command within 8 minutes.
CHECKS: list[tuple[str, Callable[[Context, float], tuple[str, dict]], float]] = [
    ("a_capture_short_batch", check_capture_short_batch, 40.0),
    ("b_graph_vs_eager_bits", check_graph_vs_eager_bits, 85.0),
    ("c_memory_flat_nvml", check_memory_flat, 35.0),
    ("d_loss_kernel_bandwidth", check_loss_kernel, 20.0),
    ("e_moshi7b_verify", check_moshi7b_verify, 100.0),
    ("f_throughput", check_throughput, 100.0),
    ("g_pytest_gpu", check_pytest_gpu, 70.0),
]
