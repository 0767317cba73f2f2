"""Memory and throughput proof for a streaming evaluation.

A `Monitor` samples memory from a daemon thread at a fixed interval beside a host-side frame count the driver feeds
it (`add_frames`), so the step loop never reads a device value for monitoring. `constant_memory_check` judges the
least-squares slope of memory vs frames after warm-up, not "first == last" (which a late free or one spike fools).
Memory sources, best first: NVML device memory used (it includes the CUDA context, allocator slack, graph pools and
other processes, so torch's allocated/reserved are recorded beside it), torch `memory_reserved` when NVML cannot be
opened on a CUDA device, process RSS on CPU; the report says why whenever it is not NVML.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import pynvml
except ImportError:  # pragma: no cover - a declared dependency, but a missing one must not break an evaluation
    pynvml = None

log = logging.getLogger(__name__)

MiB = 1 << 20
MAX_SAMPLES = 2048  # samples kept at most (see _take_sample)

# --- NVML / torch access, one small function each so tests can monkeypatch them without a GPU -------------------


def _nvml_init() -> None:
    if pynvml is None:
        raise ImportError("nvidia-ml-py (import pynvml) is not installed")
    pynvml.nvmlInit()  # the other helpers only run after this succeeded


def _nvml_shutdown() -> None:
    pynvml.nvmlShutdown()


def _nvml_handle_by_uuid(nvml_uuid: str) -> Any:
    return pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid)


def _nvml_memory_used(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _nvml_utilization(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _cuda_uuid(index: int) -> str:
    # torch renders its _CUuuid as the bare "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" form, without NVML's "GPU-" prefix.
    return str(torch.cuda.get_device_properties(index).uuid)


def _torch_cuda_memory(index: int) -> tuple[int, int, int]:
    # Host-side allocator counters: reading them never synchronises with or launches on the device.
    return torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index), torch.cuda.max_memory_allocated(index)


def _read_rss() -> int:
    """Resident set size of this process in bytes (Linux: /proc/self/statm, field 2 = resident pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_nvml(torch_uuid: str) -> tuple[Any, str | None]:
    """Initialise NVML and find the device whose UUID is `torch_uuid`: (handle, None) or (None, why not).

    Matched by UUID, never by index: CUDA_VISIBLE_DEVICES renumbers torch's devices but not NVML's. A MIG instance
    has a "MIG-" UUID in NVML, a full GPU a "GPU-" one; torch gives the bare UUID for either, so both are tried.
    """
    try:
        bare = str(uuidlib.UUID(torch_uuid.strip().removeprefix("GPU-").removeprefix("MIG-")))
    except ValueError:
        return None, f"NVML unavailable: cannot parse the torch device UUID {torch_uuid!r}"
    try:
        _nvml_init()
    except Exception as exc:  # NVMLError, ImportError, OSError...: the monitor must never crash the evaluation
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"
    error: Exception | None = None
    for prefix in ("GPU-", "MIG-"):
        try:
            return _nvml_handle_by_uuid(prefix + bare), None
        except Exception as exc:
            error = error or exc  # the GPU- miss says more than the MIG- one
    _shutdown_quietly()
    return None, f"NVML unavailable: no NVML device with UUID GPU-{bare} ({type(error).__name__}: {error})"


def _shutdown_quietly() -> None:
    try:
        _nvml_shutdown()
    except Exception as exc:
        log.debug("nvmlShutdown failed: %s", exc)


# --- constant-memory verdict --------------------------------------------------------------------------------------


def _warmup_end_index(
    times: Sequence[float], frames: Sequence[int], warmup_fraction: float, warmup_seconds: float
) -> int:
    """Index of the first steady sample.

    Warm-up ends at the LATER of (the time frames first reached warmup_fraction × final frames) and (first sample
    time + warmup_seconds): the frame rule covers the KV cache / ring buffers filling and allocator pools growing in
    the first steps of a long run, the time rule covers short runs and one-off costs (CUDA graph capture, Triton
    compilation, lazy NVML counters) whose duration does not scale with frames. Taking the later of the two means
    neither kind of warm-up growth is mistaken for a leak.
    """
    if not times:
        return 0
    target = warmup_fraction * frames[-1]
    t_frames = next((t for t, f in zip(times, frames, strict=True) if f >= target), times[-1])
    t_end = max(t_frames, times[0] + warmup_seconds)
    return next((i for i, t in enumerate(times) if t >= t_end), len(times))


_CHECK_KEYS = (
    "constant_memory", "reason", "peak_bytes", "steady_bytes", "slope_bytes_per_frame", "implied_growth_bytes",
    "tolerance_bytes", "samples_after_warmup", "warmup_end_frames",
)  # fmt: skip


def constant_memory_check(
    times: Sequence[float],
    frames: Sequence[int],
    memory: Sequence[int],
    *,
    warmup_fraction: float = 0.05,
    warmup_seconds: float = 2.0,
    min_samples: int = 5,
) -> dict[str, Any]:
    """Whether memory stayed flat after warm-up (see `_warmup_end_index` for the warm-up rule).

    After warm-up: slope = least-squares bytes per frame (float64; None if frames did not advance), implied growth =
    slope × (final frames − frames at warm-up end), tolerance = max(1 MiB, 0.5 % of the median ("steady") memory).
    constant_memory is implied growth < tolerance (a shrinking series passes), or None with a reason when there are
    fewer than `min_samples` samples after warm-up. peak_bytes is the maximum over all samples, warm-up included.
    """
    if not len(times) == len(frames) == len(memory):
        raise ValueError(f"times, frames and memory differ in length: {len(times)}, {len(frames)}, {len(memory)}")
    out: dict[str, Any] = dict.fromkeys(_CHECK_KEYS) | {"samples_after_warmup": 0}
    if not times:
        out["reason"] = "no memory samples"
        return out
    out["peak_bytes"] = int(max(memory))
    start = _warmup_end_index(times, frames, warmup_fraction, warmup_seconds)
    x = np.asarray(frames[start:], dtype=np.float64)
    y = np.asarray(memory[start:], dtype=np.float64)
    n = len(x)
    out["samples_after_warmup"] = n
    growth = tolerance = None
    if n:
        steady = float(np.median(y))
        tolerance = max(float(MiB), 0.005 * steady)
        out.update(steady_bytes=int(round(steady)), tolerance_bytes=tolerance, warmup_end_frames=int(frames[start]))
        xc = x - x.mean()
        sxx = float(xc @ xc)
        if sxx > 0:  # centred sums keep float64 exact enough for byte counts in the tens of GB
            slope = float(xc @ (y - y.mean())) / sxx
            growth = slope * (float(frames[-1]) - float(frames[start]))
            out.update(slope_bytes_per_frame=slope, implied_growth_bytes=growth)
    if n < min_samples:
        out["reason"] = f"too few samples after warm-up ({n})"
    elif growth is None or tolerance is None:
        out["reason"] = "frames did not advance after warm-up"
    else:
        out["constant_memory"] = bool(growth < tolerance)
        if not out["constant_memory"]:
            out["reason"] = (
                f"memory grows {growth / MiB:.2f} MiB over the {int(frames[-1]) - int(frames[start])} frames after "
                f"warm-up (tolerance {tolerance / MiB:.2f} MiB)"
            )
    return out


# --- the sampler --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    t: float
    frames: int
    memory: int | None  # the primary series (NVML used, torch reserved or RSS)
    utilization: int | None = None
    allocated: int | None = None
    reserved: int | None = None
    max_allocated: int | None = None


class Monitor:
    """Samples memory every `interval` s from a daemon thread; `report()` proves (or refutes) constant memory.

    Usage: `with Monitor(device) as mon:` run the steps, calling `mon.add_frames(rows * frames)` after each; then
    `mon.report()`. One start per Monitor; stop() is idempotent.
    """

    def __init__(
        self,
        device: torch.device | str,
        interval: float = 0.1,
        warmup_fraction: float = 0.05,
        warmup_seconds: float = 2.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.device = torch.device(device)
        self.interval = float(interval)
        self._period = self.interval  # the sampling period now: doubles each time the series is thinned
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_seconds = float(warmup_seconds)
        self.memory_source: str | None = None
        self.memory_source_reason: str | None = None
        self._lock = threading.Lock()  # guards _frames and _samples (driver thread vs sampler thread vs report)
        self._frames = 0
        self._samples: list[_Sample] = []
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._cuda_index: int | None = None
        self._handle: Any = None
        self._read_failed = False

    def start(self) -> Monitor:
        if self._thread is not None:
            raise RuntimeError("a Monitor can only be started once")
        self._open_source()
        self._take_sample()  # the baseline, before any frame
        self._thread = threading.Thread(target=self._run, name="fused_stream-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._stopped:
            return
        self._stopped = True
        self._stop_event.set()
        self._thread.join()
        self._take_sample()  # after the join, so the final sample is also the last one in time
        if self._handle is not None:
            self._handle = None
            _shutdown_quietly()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_frames(self, n: int) -> None:
        """Count `n` more frames scored (host-side: batch rows × frames per step); safe from any thread."""
        with self._lock:
            self._frames += n

    def latest(self) -> tuple[int, int | None]:
        """(frames counted, the newest memory sample in bytes or None): host-side values for a progress bar."""
        with self._lock:
            memory = next((s.memory for s in reversed(self._samples) if s.memory is not None), None)
            return self._frames, memory

    def _open_source(self) -> None:
        if self.device.type == "cuda":
            try:
                self._cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                handle, reason = _open_nvml(_cuda_uuid(self._cuda_index))
            except Exception as exc:
                handle, reason = None, f"NVML unavailable: cannot identify the CUDA device ({exc})"
            if handle is not None:
                self._handle, self.memory_source = handle, "nvml"
            else:
                self.memory_source = "torch_reserved"
                self.memory_source_reason = f"{reason}; primary memory series is torch memory_reserved"
            return
        self.memory_source_reason = f"device is {self.device.type}"
        try:
            _read_rss()
            self.memory_source = "rss"
        except Exception as exc:
            self.memory_source_reason += f"; process RSS unavailable: {type(exc).__name__}: {exc}"

    def _take_sample(self) -> None:
        memory = utilization = allocated = reserved = max_allocated = None
        try:
            if self._cuda_index is not None:
                allocated, reserved, max_allocated = _torch_cuda_memory(self._cuda_index)
            if self.memory_source == "nvml":
                memory = _nvml_memory_used(self._handle)
                try:
                    utilization = _nvml_utilization(self._handle)
                except Exception:  # e.g. NVMLError_NotSupported on a MIG instance: memory still counts
                    utilization = None
            elif self.memory_source == "torch_reserved":
                memory = reserved
            elif self.memory_source == "rss":
                memory = _read_rss()
        except Exception as exc:  # a failed read becomes a gap in the series, never a dead thread or a crashed eval
            if not self._read_failed:
                self._read_failed = True
                log.warning("memory sample failed (%s: %s); such samples are skipped", type(exc).__name__, exc)
        with self._lock:
            self._samples.append(
                _Sample(time.perf_counter(), self._frames, memory, utilization, allocated, reserved, max_allocated)
            )
            if len(self._samples) >= MAX_SAMPLES:
                # Bounded memory for runs of any length: a growing sample list would itself be the leak the
                # monitor reports (RSS). Keep every other sample (the baseline stays first) and sample half as
                # often from now on, so the series keeps covering the whole run evenly.
                self._samples = self._samples[::2]
                self._period *= 2

    def _run(self) -> None:
        while not self._stop_event.wait(self._period):
            self._take_sample()

    def report(self) -> dict[str, Any]:
        """JSON-serialisable summary: memory source, constant-memory verdict and throughput (may be called live)."""
        with self._lock:
            samples, frames = list(self._samples), self._frames
        known = [s for s in samples if s.memory is not None]
        out: dict[str, Any] = {
            "memory_source": self.memory_source,
            "memory_source_reason": self.memory_source_reason,
            "interval_s": self.interval,
            "samples": len(samples),
            "baseline_bytes": samples[0].memory if samples else None,
        }
        out.update(
            constant_memory_check(
                [s.t for s in known],
                [s.frames for s in known],
                [s.memory for s in known],
                warmup_fraction=self.warmup_fraction,
                warmup_seconds=self.warmup_seconds,
            )
        )
        if self.device.type == "cuda":
            utilization = [s.utilization for s in samples if s.utilization is not None]
            out.update(
                torch_allocated_peak_bytes=_max_or_none(s.allocated for s in samples),
                torch_reserved_peak_bytes=_max_or_none(s.reserved for s in samples),
                torch_max_allocated_bytes=_max_or_none(s.max_allocated for s in samples),
                gpu_utilization_mean=sum(utilization) / len(utilization) if utilization else None,
            )
        # throughput over all samples (memory gaps do not matter here), and from the same warm-up end as the check
        times, counts = [s.t for s in samples], [s.frames for s in samples]
        start = _warmup_end_index(times, counts, self.warmup_fraction, self.warmup_seconds)
        out.update(frames=frames, seconds=times[-1] - times[0] if samples else None)
        out["frames_per_second"] = _rate(counts[-1] - counts[0], out["seconds"]) if samples else None
        out["steady_frames_per_second"] = (
            _rate(counts[-1] - counts[start], times[-1] - times[start]) if start < len(samples) else None
        )
        return out


def _rate(frames: int, seconds: float | None) -> float | None:
    return frames / seconds if seconds else None


def _max_or_none(values: Any) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def warn_memory_growth(report: dict[str, Any], label: str, memory_check: bool) -> None:
    """A paper-metrics config's `memory_check`: a warning (its meaning there), never a failure, when memory grew."""
    if memory_check and report.get("constant_memory") is False:
        memory = report.get("memory", {})
        log.warning("model %s: memory grew with the frames streamed (by %.1f MiB, %s): memory_check", label,
                    (memory.get("implied_growth_bytes") or 0) / 2**20, memory.get("memory_source"))
