"""`python -m fused_stream.gpu_check`: one command that proves the GPU claims, one pass/fail line per check.

On one H100/H200 it fits in 8 minutes by design: the checks' budgets add up to `--budget` (default 450 s, a global
deadline; each check also stops at its own budget), the start-up (bootstrap, imports) takes the rest; the models are
built once and shared (`small`, then `moshi-7b`), compiled kernels are shared in-process and through one on-disk
cache for the two subprocesses. It writes `bench/results/<gpu>-<date>.json` and `.md` (the GPU name lowercased and
slugged, e.g. `nvidia-h200-2026-11-30`; a second run the same day gets `-b`, `-c`, ...) after every check, so what
finished is on disk even if a later check kills the process or the machine is taken back (`"complete": false`
until the last check). The checks, in order (`checks.CHECKS`):

  a. capture_short_batch: a short batch (tiny, T=8, C=4, cuda_graphs="on") in its own subprocess (a device-side
     assert kills the process that hits it);
  b. graph_vs_eager_bits: `small` in bf16 streamed past its 3000-frame ring at C=1 and C=8 with every call of the
     batch replayed and compared with an eager call from the same start (every fill bucket's graph, the full-ring
     one included), then (C=8) a separate eager run whose losses must equal the graphed run's bit for bit;
  c. memory_flat_nvml: `assert_constant_memory=True` over 20k frames, memory read from NVML;
  d. loss_kernel_bandwidth: the fused loss step against `F.cross_entropy` at B=8, C=1 and C=64, timed with CUDA
     events over >= 0.1 s of back-to-back calls, in GB/s and as % of the card's HBM bandwidth;
  e. moshi7b_verify: `moshi-7b` (bf16, random weights) B=2, T=600, graphed, with the verification against
     `LMModel.forward` on by default;
  f. throughput: frame mode graphed vs eager at B=1 and B=8 and chunk mode C=64 on the same `moshi-7b`: frames/s
     over the batch loop only (capture and compilation left out), the roofline ratio with the KV bytes the steps
     actually read, the MFU;
  g. pytest_gpu: `pytest -m gpu` in a subprocess, last (it builds its own models).

Each check runs in its own try/except under its budget: a failing check records its error and the run goes on; the
exit status is 1 when any check failed, 2 when the machine cannot run it (`bootstrap`: no C compiler or Python
headers for Triton, moshi neither importable nor installable from `--wheels`). `--dry-run` runs the same sequence
on the CPU with tiny sizes and rehearsed graphs (`cuda_graphs="rehearse"`): every check's control flow, the ring
wrap included; the files go to a temporary directory (or `--out`).
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

from .bootstrap import DEFAULT_WHEELS, missing_toolchain
from .checks import CHECKS, CheckSkipped, CheckTimeout, Context, free_cuda

DEFAULT_BUDGET_S = 450.0  # the checks' budgets (checks.CHECKS) add up to this; start-up fits in the rest of 8 min


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
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "installed (no __version__)")
            out[f"{name}_path"] = str(Path(module.__file__).parent) if getattr(module, "__file__", None) else None
        except Exception as exc:  # noqa: BLE001 - a missing package is a fact to record, not an error
            out[name] = f"not importable ({type(exc).__name__})"
    out["toolchain"] = missing_toolchain() or "C compiler and Python headers found"
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
    _write(json_path, json.dumps(record, indent=2, default=str) + "\n")
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
    verdict = f"FAILED: {', '.join(failed)}" if failed else "no check failed"
    if not record.get("complete", True):
        verdict += f" (incomplete: {record.get('stopped') or 'still running'})"
    lines += ["", f"**{verdict}**", ""]
    _write(md_path, "\n".join(lines))
    return json_path, md_path


def _write(path: Path, text: str) -> None:
    """Atomically: a reader (or a run killed mid-write) sees the previous version or this one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_stream.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU with tiny sizes")
    parser.add_argument("--out", help="where the .json and .md go (default bench/results; dry run: a temp dir)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all the checks")
    parser.add_argument("--only", help="comma-separated check names (or their letters a..g) to run")
    parser.add_argument("--wheels", default=str(DEFAULT_WHEELS),
                        help="moshi and sphn wheels, installed (no network) when moshi is missing (default .whl/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    repo = Path(__file__).resolve().parents[2]
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run
                                           else repo / "bench" / "results")
    env = dict(os.environ)  # PYTHONPATH already holds the wheels' folder when bootstrap installed them
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    # One compile cache for this process and the subprocesses: Triton's kernels and inductor's graphs built once.
    cache = Path(tempfile.gettempdir()) / "fused_stream_gpu_check_cache"
    for key, sub in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        os.environ.setdefault(key, str(cache / sub))
        env.setdefault(key, os.environ[key])
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the subprocesses stay on the CPU too
    env.setdefault("PYTHONUNBUFFERED", "1")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    ctx = Context(dry_run=args.dry_run, cuda=cuda, env=env, work=work, repo=repo)
    info = versions()
    print(f"versions: torch {info['torch']}, triton {info['triton']}, moshi {info['moshi']}, sphn {info['sphn']}, "
          f"GPU {info['gpu'] or 'none'}, driver {info['driver'] or 'none'}; {info['toolchain']}", flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    results: list[CheckResult] = []
    record: dict[str, Any] = {
        "gpu": info["gpu"] or "cpu", "date": _dt.date.today().isoformat(), "dry_run": args.dry_run,
        "versions": info, "budget_seconds": args.budget, "work_dir": str(work), "complete": False, "stopped": None,
        "checks": [],
    }
    stem = result_stem(out, info["gpu"] if cuda else "cpu", record["date"])

    def save() -> tuple[Path, Path]:
        record["seconds"] = time.perf_counter() - started
        record["checks"] = [asdict(r) for r in results]
        return write_results(stem, record)

    def stop(signum: int, frame: Any) -> None:  # the machine is taken back: keep what finished, then go
        record["stopped"] = f"signal {signal.Signals(signum).name} during the checks"
        save()
        print(f"stopped by {signal.Signals(signum).name}; wrote what finished to {stem}.json", flush=True)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
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
            save()
        record["complete"] = True
        json_path, md_path = save()
    except KeyboardInterrupt:
        record["stopped"] = "interrupted (Ctrl-C)"
        save()
        print(f"interrupted; wrote what finished to {stem}.json", flush=True)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [r.name for r in results if r.status == "fail"]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'OK: no check failed'} "
          f"({record['seconds']:.0f} s); wrote {json_path} and {md_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
