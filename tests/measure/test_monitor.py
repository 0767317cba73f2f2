"""Monitor: constant-memory verdicts on scripted series, RSS sampling on CPU, NVML fallbacks, roofline arithmetic."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pynvml
import pytest
import torch

from fused_stream.measure import monitor as mon
from fused_stream.measure.monitor import Monitor, constant_memory_check

MiB = 1 << 20
GiB = 1 << 30
BARE_UUID = "01234567-89ab-cdef-0123-456789abcdef"


def series(n=201, total_frames=100_000, seconds=20.0):
    """n samples evenly spaced over `seconds`, frames growing linearly to `total_frames`."""
    times = np.linspace(0.0, seconds, n)
    frames = np.linspace(0, total_frames, n).round().astype(np.int64)
    return times.tolist(), frames.tolist()


# --- constant_memory_check on scripted series ---------------------------------------------------------------------


def test_flat_series_is_constant():
    times, frames = series()
    out = constant_memory_check(times, frames, [2 * GiB] * len(times))
    assert out["constant_memory"] is True and out["reason"] is None
    assert out["slope_bytes_per_frame"] == 0.0 and out["implied_growth_bytes"] == 0.0
    assert out["peak_bytes"] == out["steady_bytes"] == 2 * GiB
    json.dumps(out)


def test_slow_leak_fails():
    times, frames = series()
    memory = [GiB + 1024 * f for f in frames]  # +1 KiB per frame: ~98 MiB over the run
    out = constant_memory_check(times, frames, memory)
    assert out["constant_memory"] is False and "grows" in out["reason"]
    assert out["slope_bytes_per_frame"] == pytest.approx(1024.0)
    assert out["implied_growth_bytes"] == pytest.approx(1024.0 * (frames[-1] - out["warmup_end_frames"]))


def test_step_growth_after_warmup_fails():
    times, frames = series()
    memory = [2 * GiB + (50 * MiB if f > frames[-1] // 2 else 0) for f in frames]
    out = constant_memory_check(times, frames, memory)
    assert out["constant_memory"] is False
    assert out["peak_bytes"] == 2 * GiB + 50 * MiB


def test_noisy_flat_series_is_constant():
    times, frames = series()
    rng = np.random.default_rng(0)
    memory = (2 * GiB + rng.normal(0.0, 2 * MiB, len(times))).astype(np.int64).tolist()
    out = constant_memory_check(times, frames, memory)
    assert out["constant_memory"] is True
    assert abs(out["implied_growth_bytes"]) < out["tolerance_bytes"]


def test_too_few_samples_gives_no_verdict():
    times, frames = series(n=20, seconds=2.5)  # only the samples at t >= 2 s are past warm-up: 4 of them
    out = constant_memory_check(times, frames, [GiB] * 20)
    assert out["constant_memory"] is None
    assert out["reason"] == f"too few samples after warm-up ({out['samples_after_warmup']})"
    assert out["samples_after_warmup"] < 5
    assert constant_memory_check([], [], [])["constant_memory"] is None


def test_growth_inside_warmup_only_is_constant():
    times, frames = series()  # warm-up ends at 2 s (10 % of frames > 5 %)
    memory = [GiB + (int(300 * MiB * t / 2.0) if t < 2.0 else 300 * MiB) for t in times]
    out = constant_memory_check(times, frames, memory)
    assert out["constant_memory"] is True
    assert out["warmup_end_frames"] == frames[times.index(2.0)]
    # the warm-up rule is the LATER of the two: with 50 % of frames required, the slope is measured from t = 10 s
    late = constant_memory_check(times, frames, memory, warmup_fraction=0.5)
    assert late["warmup_end_frames"] == frames[-1] // 2


def test_warmup_frames_rule_can_be_the_later_one():
    # frames arrive late (nothing for 5 s), so 5 % of frames is reached after the 2 s time rule
    times = [float(t) for t in range(21)]
    frames = [0] * 6 + [1000 * (i + 1) for i in range(15)]
    # memory rises once, when the first frames arrive (t = 6): measured from the 2 s time rule alone it looks like
    # growth, measured from the later frame rule it is flat
    memory = [GiB + (100 * MiB if t >= 6 else 0) for t in range(21)]
    assert constant_memory_check(times, frames, memory)["constant_memory"] is True
    assert constant_memory_check(times, frames, memory, warmup_fraction=0.0)["constant_memory"] is False


def test_tolerance_by_hand():
    times = [float(t) for t in range(11)]  # warmup_seconds=0, fraction=0: all 11 samples count
    frames = [1000 * t for t in range(11)]
    # 0.5 % of 100 MiB = 0.5 MiB < 1 MiB, so the floor applies
    out = constant_memory_check(times, frames, [100 * MiB] * 11, warmup_fraction=0.0, warmup_seconds=0.0)
    assert out["tolerance_bytes"] == 1048576
    # steady 1 GiB -> tolerance 0.005 * 2**30 = 5_368_709.12 bytes; growth over 10_000 frames just under / over it
    for growth, verdict in ((5_300_000, True), (5_400_000, False)):
        slope = growth / 10_000
        # a ramp centred on 1 GiB keeps the median (the 6th of 11 values) exactly 1 GiB
        memory = [GiB + slope * (f - 5000) for f in frames]
        out = constant_memory_check(times, frames, memory, warmup_fraction=0.0, warmup_seconds=0.0)
        assert out["steady_bytes"] == GiB
        assert out["tolerance_bytes"] == pytest.approx(5_368_709.12)
        assert out["implied_growth_bytes"] == pytest.approx(growth)
        assert out["constant_memory"] is verdict
    shrinking = [GiB - 10_000 * f for f in frames]
    assert constant_memory_check(times, frames, shrinking, warmup_seconds=0.0)["constant_memory"] is True


def test_frames_not_advancing_gives_no_verdict():
    times = [float(t) for t in range(10)]
    out = constant_memory_check(times, [0] * 10, [GiB] * 10, warmup_seconds=0.0)
    assert out["constant_memory"] is None and out["slope_bytes_per_frame"] is None
    with pytest.raises(ValueError):
        constant_memory_check([0.0], [0, 1], [GiB])


# --- sampling on CPU (RSS) ----------------------------------------------------------------------------------------


def test_rss_sampling_sees_an_allocation():
    with Monitor("cpu", interval=0.005, warmup_seconds=0.0) as monitor:
        time.sleep(0.03)
        big = torch.ones(50_000_000)  # 200 MB, written so every page is resident
        for _ in range(10):
            monitor.add_frames(100)
            time.sleep(0.005)
        time.sleep(0.03)
        report = monitor.report()  # live report while still running
        assert report["samples"] >= 2
    final = monitor.report()
    del big
    assert final["memory_source"] == "rss"
    assert "cpu" in final["memory_source_reason"]
    assert final["peak_bytes"] - final["baseline_bytes"] >= 150_000_000
    assert final["frames"] == 1000
    assert final["frames_per_second"] > 0 and final["seconds"] > 0
    assert "gpu_utilization_mean" not in final
    json.dumps(final)
    monitor.stop()  # idempotent


def test_rss_unreadable_reports_none(monkeypatch):
    def broken() -> int:
        raise OSError("no /proc here")

    monkeypatch.setattr(mon, "_read_rss", broken)
    with Monitor("cpu", interval=0.01) as monitor:
        monitor.add_frames(5)
        time.sleep(0.03)
    report = monitor.report()
    assert report["memory_source"] is None
    assert "RSS unavailable" in report["memory_source_reason"] and "no /proc here" in report["memory_source_reason"]
    assert report["baseline_bytes"] is None and report["peak_bytes"] is None and report["constant_memory"] is None
    assert report["frames"] == 5
    json.dumps(report)


# --- the CUDA branch without a GPU: NVML patched ------------------------------------------------------------------


class FakeNvml:
    """Scripted NVML: one device with UUID `nvml_uuid`, used memory from `used` (the last value repeats)."""

    def __init__(self, monkeypatch, nvml_uuid=f"GPU-{BARE_UUID}", used=(GiB,), utilization=40):
        self.used, self.calls, self.shutdowns = list(used), [], 0
        self.nvml_uuid = nvml_uuid

        def handle_by_uuid(u: str):
            self.calls.append(u)
            if u != self.nvml_uuid:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return "handle"

        def memory_used(handle) -> int:
            assert handle == "handle"
            return self.used.pop(0) if len(self.used) > 1 else self.used[0]

        def shutdown() -> None:
            self.shutdowns += 1

        monkeypatch.setattr(mon, "_nvml_init", lambda: None)
        monkeypatch.setattr(mon, "_nvml_shutdown", shutdown)
        monkeypatch.setattr(mon, "_nvml_handle_by_uuid", handle_by_uuid)
        monkeypatch.setattr(mon, "_nvml_memory_used", memory_used)
        monkeypatch.setattr(mon, "_nvml_utilization", lambda handle: utilization)
        monkeypatch.setattr(mon, "_cuda_uuid", lambda index: BARE_UUID)
        monkeypatch.setattr(mon, "_torch_cuda_memory", lambda index: (100, 200, 300))


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), ImportError("no pynvml"), OSError("boom")]
)
def test_open_nvml_init_failure_is_a_reason(monkeypatch, error):
    def fail() -> None:
        raise error

    monkeypatch.setattr(mon, "_nvml_init", fail)
    handle, reason = mon._open_nvml(BARE_UUID)
    assert handle is None and reason.startswith("NVML unavailable") and str(error) in reason


def test_open_nvml_matches_by_uuid(monkeypatch):
    fake = FakeNvml(monkeypatch)
    assert mon._open_nvml(BARE_UUID.upper()) == ("handle", None)  # torch's bare form -> NVML's "GPU-" form
    assert fake.calls == [f"GPU-{BARE_UUID}"]
    mig = FakeNvml(monkeypatch, nvml_uuid=f"MIG-{BARE_UUID}")
    assert mon._open_nvml(BARE_UUID) == ("handle", None)
    assert mig.calls == [f"GPU-{BARE_UUID}", f"MIG-{BARE_UUID}"]


def test_open_nvml_unknown_uuid_is_a_reason(monkeypatch):
    fake = FakeNvml(monkeypatch, nvml_uuid=f"GPU-{uuid.UUID(int=0)}")
    handle, reason = mon._open_nvml(BARE_UUID)
    assert handle is None and BARE_UUID in reason and fake.shutdowns == 1
    assert mon._open_nvml("not-a-uuid")[0] is None


def test_cuda_without_nvml_falls_back_to_torch_reserved(monkeypatch):
    FakeNvml(monkeypatch)

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(mon, "_nvml_init", fail)
    with Monitor("cuda:0", interval=0.01) as monitor:
        monitor.add_frames(10)
        time.sleep(0.03)
    report = monitor.report()
    assert report["memory_source"] == "torch_reserved"
    assert "NVML unavailable" in report["memory_source_reason"] and "memory_reserved" in report["memory_source_reason"]
    assert report["baseline_bytes"] == report["peak_bytes"] == 200
    assert report["gpu_utilization_mean"] is None
    json.dumps(report)


def test_fake_nvml_report(monkeypatch):
    fake = FakeNvml(monkeypatch, used=[GiB + 7 * MiB, *([GiB] * 10_000)])  # the baseline is the first value
    with Monitor("cuda:0", interval=0.002, warmup_fraction=0.0, warmup_seconds=0.0) as monitor:
        for _ in range(30):
            monitor.add_frames(8)
            time.sleep(0.003)
    monitor.stop()
    report = monitor.report()
    assert report["memory_source"] == "nvml" and report["memory_source_reason"] is None
    assert report["baseline_bytes"] == GiB + 7 * MiB
    assert report["peak_bytes"] == GiB + 7 * MiB and report["steady_bytes"] == GiB
    assert report["constant_memory"] is True
    assert report["gpu_utilization_mean"] == 40
    assert report["torch_allocated_peak_bytes"] == 100
    assert report["torch_reserved_peak_bytes"] == 200
    assert report["torch_max_allocated_bytes"] == 300
    assert report["frames"] == 240 and report["frames_per_second"] > 0 and report["steady_frames_per_second"] > 0
    assert fake.shutdowns == 1  # stop() twice shut NVML down once
    json.dumps(report)


def test_failed_reads_become_gaps(monkeypatch):
    FakeNvml(monkeypatch)
    reads = iter([GiB])

    def flaky(handle) -> int:
        return next(reads)  # the baseline succeeds, every later read raises StopIteration

    monkeypatch.setattr(mon, "_nvml_memory_used", flaky)
    with Monitor("cuda:0", interval=0.005) as monitor:
        time.sleep(0.03)
    report = monitor.report()
    assert report["samples"] >= 2 and report["peak_bytes"] == GiB and report["constant_memory"] is None


# --- roofline ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_monitor_on_cuda_uses_nvml():
    device = torch.device("cuda:0")
    with Monitor(device, interval=0.01, warmup_seconds=0.0) as monitor:
        x = torch.ones(64 * MiB, device=device)  # 256 MiB
        for _ in range(10):
            x.add_(1.0)
            monitor.add_frames(1)
            time.sleep(0.01)
        torch.cuda.synchronize(device)
    report = monitor.report()
    assert report["memory_source"] == "nvml", report["memory_source_reason"]
    assert report["peak_bytes"] >= 256 * MiB
    assert report["torch_allocated_peak_bytes"] >= 256 * MiB
    assert report["torch_reserved_peak_bytes"] >= report["torch_allocated_peak_bytes"]
    assert report["torch_max_allocated_bytes"] >= 256 * MiB
    json.dumps(report)


def test_the_sample_series_stays_bounded(monkeypatch):
    """Hours of sampling must not grow the monitor's own memory: the series is thinned, the period doubled."""
    monkeypatch.setattr(mon, "MAX_SAMPLES", 16)
    monitor = Monitor("cpu", interval=0.001, warmup_seconds=0.0)
    with monitor:
        for _ in range(200):
            monitor.add_frames(10)
            time.sleep(0.001)
    report = monitor.report()
    assert report["samples"] < 16 and monitor._period > monitor.interval
    assert report["frames"] == 2000 and report["baseline_bytes"] is not None
