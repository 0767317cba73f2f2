"""`python -m fused_stream.gpu_check`: one command that proves the GPU claims, one pass/fail line per check.

On one H100/H200 it runs in under 9 minutes (a global deadline, `--budget`, default 520 s; each check also has its
own budget) and writes `bench/results/<gpu>-<date>.json` and `.md` (the GPU name lowercased and slugged, e.g.
`nvidia-h200-2026-11-30`; a second run the same day gets `-b`, `-c`, ...). The checks, in order:

  a. capture_short_batch: a short batch (tiny, T=8, C=4, cuda_graphs="on") in its own subprocess (a device-side
     assert kills the process that hits it);
  b. pytest_gpu: `pytest -m gpu` in a subprocess;
  c. graph_vs_eager_bits: `small` in bf16, `EvalConfig(cuda_graphs="on", verify_graph=200)` (200 replays equal to
     200 eager calls bit for bit, inside the driver), then a separate eager run whose losses must equal the graphed
     run's bit for bit;
  d. memory_flat_nvml: `assert_constant_memory=True` over >= 20k frames, memory read from NVML;
  e. moshi7b_cli_verify: `python -m fused_stream.eval --model moshi-7b --generate 2 --frames 600 --verify` in a
     subprocess (CUDA graphs on by default there);
  f. loss_kernel_bandwidth: the fused loss step against `F.cross_entropy` at B=8, C=1 and C=64, in GB/s and as % of
     the card's HBM bandwidth (`measure.throughput.gpu_spec`);
  g. throughput: frame mode graphed vs eager at B=1 and B=8 and chunk mode C=64 on `moshi-7b`, with the steady
     frames/s, the roofline ratio and the MFU of `result.report["throughput"]`.

Each check runs in its own try/except under its budget: a failing check records its error and the run goes on; the
exit status is 1 when any check failed. `--dry-run` runs the same sequence on the CPU with tiny sizes: what needs
CUDA reports "skipped: no CUDA", the rest runs, and the files go to a temporary directory (or `--out`).

Where moshi is not installed next to the machine's torch: when `import moshi` fails and `.whl/` holds the moshi
and sphn wheels, they are installed with `pip install --no-index --no-deps --target <tmp>` and put first on
sys.path and on the subprocesses' PYTHONPATH. This module imports nothing that imports moshi before that.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGET_S = 520.0  # the whole run, under the 9 minutes promised on one H100/H200
SKIP_NO_CUDA = "skipped: no CUDA"


class CheckSkipped(Exception):
    """A check that cannot run here (no CUDA, out of time): recorded as skipped, not failed."""


class CheckTimeout(Exception):
    """A check ran past its budget."""


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skipped"
    seconds: float
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def line(self) -> str:
        word = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}[self.status]
        return f"{word:4}  {self.name:24} {self.seconds:7.1f} s  {self.detail}"


@dataclass
class Context:
    dry_run: bool
    cuda: bool
    env: dict[str, str]  # for subprocesses: PYTHONPATH with the installed wheels
    work: Path  # scratch space for the subprocesses' outputs
    repo: Path  # where tests/ lives (pytest -m gpu runs there)
    cache: dict[str, Any] = field(default_factory=dict)  # models shared between checks


# --- moshi from .whl/ -------------------------------------------------------------------------------------------------


def ensure_moshi(wheels: Path = Path(".whl"), target: Path | None = None) -> str | None:
    """Make `import moshi` work: install `wheels/*.whl` into `target` (a temp dir) if moshi is missing.

    Returns the directory prepended to sys.path and PYTHONPATH, or None when moshi imports as it is (or there are
    no wheels to install: the import error then surfaces where moshi is first used).
    """
    try:
        importlib.import_module("moshi")
        return None
    except ImportError:
        pass
    files = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return None
    target = target or Path(tempfile.mkdtemp(prefix="fused_stream_wheels_"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(target), *files], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return str(target)


def versions() -> dict[str, Any]:
    """torch, triton, moshi, sphn, the GPU and its driver, the Python and the commit: what was measured."""
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_runtime": torch.version.cuda}
    for name in ("triton", "moshi", "sphn"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed (no __version__)")
        except Exception as exc:  # noqa: BLE001 - a missing package is a fact to record, not an error
            out[name] = f"not importable ({type(exc).__name__})"
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out["driver"] = _nvidia_driver() if torch.cuda.is_available() else None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            return None


def slug(text: str) -> str:
    """`NVIDIA H200` -> `nvidia-h200`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_stem(out: Path, gpu: str, date: str) -> Path:
    """out/<gpu>-<date>, with -b, -c, ... when a run of that day is already there."""
    base = f"{slug(gpu)}-{date}"
    for suffix in [""] + [f"-{chr(c)}" for c in range(ord("b"), ord("z") + 1)]:
        stem = out / f"{base}{suffix}"
        if not stem.with_suffix(".json").exists() and not stem.with_suffix(".md").exists():
            return stem
    raise FileExistsError(f"too many runs named {base} in {out}")


# --- running a check under its budget ---------------------------------------------------------------------------------


@contextmanager
def _deadline(seconds: float):
    """Raise CheckTimeout in the main thread after `seconds` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_check(name: str, fn: Callable[[Context, float], tuple[str, dict]], ctx: Context, budget: float) -> CheckResult:
    start = time.perf_counter()
    try:
        with _deadline(budget + 5):  # a subprocess check enforces `budget` itself; this is the backstop
            detail, data = fn(ctx, budget)
        return CheckResult(name, "pass", time.perf_counter() - start, detail, data)
    except CheckSkipped as skip:
        return CheckResult(name, "skipped", time.perf_counter() - start, str(skip))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and the run goes on
        message = f"{type(exc).__name__}: {exc}".strip()
        first = message.splitlines()[0] if message else type(exc).__name__
        return CheckResult(name, "fail", time.perf_counter() - start, first[:300], error=traceback.format_exc())
    finally:
        _free_cuda()


def _free_cuda() -> None:
    import gc

    gc.collect()
    try:
        import torch

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
    import torch

    from .data.models import load_model

    if preset not in ctx.cache:
        ctx.cache.clear()  # one model at a time: moshi-7b and another do not need to share the card
        _free_cuda()
        device = "cuda" if ctx.cuda else "cpu"
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        ctx.cache[preset] = load_model(preset, device=device, dtype=dtype, seed=0, **kwargs)
    return ctx.cache[preset]


def check_graph_vs_eager_bits(ctx: Context, budget: float) -> tuple[str, dict]:
    _needs_cuda(ctx)
    import torch

    from .core.config import EvalConfig
    from .core.driver import StreamingEvaluator
    from .data.codes import generate_codes

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
    from .core.config import EvalConfig
    from .core.driver import StreamingEvaluator
    from .data.codes import generate_codes

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
    import torch

    from .kernels import cross_entropy as ce
    from .measure.throughput import gpu_spec

    device = torch.device("cuda" if ctx.cuda else "cpu")
    spec = gpu_spec(torch.cuda.get_device_name(device)) if ctx.cuda else None
    shapes = [(8, 1), (8, 64)] if ctx.cuda else [(2, 1), (2, 4)]
    rows, parts = [], []
    backend = "triton" if ctx.cuda else "torch"
    for B, C in shapes:
        args = _loss_step(B, C, device, small=not ctx.cuda)
        fused = _time(lambda args=args: ce.step_cross_entropy_(*args, lead=1, backend=backend), device)
        plain = _time(lambda args=args: _plain_step(*args, lead=1), device)
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


def _loss_step(B: int, C: int, device: Any, small: bool) -> tuple:
    """One step's logits, targets and buffers at Moshi's vocabularies (the CPU dry run: small vocabularies)."""
    import torch

    from .kernels import cross_entropy as ce

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


def _plain_step(text, audio, targets, delays, lengths, offset, out, counts, lead: int) -> None:
    """What a user writes: F.cross_entropy(x.float()) per stream, a mask, an index write (bench/test_kernel_bench)."""
    import torch
    import torch.nn.functional as F

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
    import statistics

    import torch

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
    from .core.config import EvalConfig
    from .core.driver import StreamingEvaluator
    from .data.codes import generate_codes

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


# --- the files --------------------------------------------------------------------------------------------------------


def write_results(stem: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    v = record["versions"]
    lines = [
        f"# gpu_check: {v.get('gpu') or 'CPU (dry run)'}, {record['date']}",
        "",
        f"torch {v.get('torch')}, triton {v.get('triton')}, moshi {v.get('moshi')}, sphn {v.get('sphn')}, "
        f"driver {v.get('driver')}, commit {v.get('commit')}{' — dry run' if record['dry_run'] else ''}",
        "",
        "| check | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    for check in record["checks"]:
        detail = str(check["detail"]).replace("|", "/")
        lines.append(f"| {check['name']} | {check['status']} | {check['seconds']:.1f} | {detail} |")
    failed = [c["name"] for c in record["checks"] if c["status"] == "fail"]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'no check failed'}**", ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_stream.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU with tiny sizes")
    parser.add_argument("--out", help="where the .json and .md go (default bench/results; dry run: a temp dir)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--only", help="comma-separated check names (or their letters a..g) to run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    wheels_dir = ensure_moshi()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    repo = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run
                                           else repo / "bench" / "results")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the subprocesses stay on the CPU too
    env.setdefault("PYTHONUNBUFFERED", "1")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    ctx = Context(dry_run=args.dry_run, cuda=cuda, env=env, work=work, repo=repo)
    info = versions()
    print(f"versions: torch {info['torch']}, triton {info['triton']}, moshi {info['moshi']}, sphn {info['sphn']}, "
          f"GPU {info['gpu'] or 'none'}, driver {info['driver'] or 'none'}"
          + (f" (wheels from .whl/ in {wheels_dir})" if wheels_dir else ""), flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    results: list[CheckResult] = []
    for name, fn, own_budget in CHECKS:
        if wanted is not None and name not in wanted and name[0] not in wanted:
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 5:
            result = CheckResult(name, "skipped", 0.0, f"skipped: out of time (--budget {args.budget:.0f} s)")
        else:
            result = run_check(name, fn, ctx, min(own_budget, left))
        results.append(result)
        print(result.line(), flush=True)
    date = _dt.date.today().isoformat()
    record = {
        "gpu": info["gpu"] or "cpu", "date": date, "dry_run": args.dry_run, "versions": info,
        "seconds": time.perf_counter() - started, "work_dir": str(work),
        "checks": [asdict(r) for r in results],
    }
    json_path, md_path = write_results(result_stem(out, info["gpu"] if cuda else "cpu", date), record)
    failed = [r.name for r in results if r.status == "fail"]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'OK: no check failed'} "
          f"({record['seconds']:.0f} s); wrote {json_path} and {md_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
