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

Where moshi is not installed next to the machine's torch (a GPU image with a newer torch), install the moshi and
sphn wheels first and put them on PYTHONPATH (`pip install --no-index --no-deps --target DIR .whl/*.whl`): the
package itself imports moshi, so it cannot install them for itself.
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

import torch

from .checks import CHECKS, CheckSkipped, CheckTimeout, Context, free_cuda

DEFAULT_BUDGET_S = 520.0  # the whole run, under the 9 minutes promised on one H100/H200


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


def versions() -> dict[str, Any]:
    """torch, triton, moshi, sphn, the GPU and its driver, the Python and the commit: what was measured."""
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
        free_cuda()


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
    cuda = torch.cuda.is_available() and not args.dry_run
    repo = Path(__file__).resolve().parents[2]
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
          , flush=True)
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
