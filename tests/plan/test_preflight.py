"""Preflight memory estimate: exact KV bytes, Moshi 7B on the meta device, calibration against measured RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moshi.models.lm import LMModel

from fused_stream.data.models import load_model, preset_config
from fused_stream.engine.stream import enlarge_rings, held_state_bytes
from fused_stream.plan.preflight import (
    RUNTIME_OVERHEAD,
    GiB,
    MemoryEstimate,
    PreflightError,
    available_bytes,
    check_fits,
    estimate_run_bytes,
    pick_batch_size,
)

REPO = Path(__file__).resolve().parents[2]
MOSHI_KV_PER_SEQUENCE = 32 * 2 * 3000 * 4096 * 2  # layers x (K, V) x context x dim x bf16 bytes


@pytest.fixture(scope="module")
def moshi_7b_meta() -> LMModel:
    # The meta device gives every tensor its shape and dtype without memory: the real 7B config, 0 bytes.
    return LMModel(**preset_config("moshi-7b"), device="meta", dtype=torch.bfloat16)


def allocated_state_bytes(model: LMModel, B: int, C: int) -> int:
    """What the driver actually allocates: streaming(B), then the enlarged rings of chunk mode."""
    with model.streaming(B):
        if C > 1:
            enlarge_rings(model, context_extra=C - 1)
        return held_state_bytes(model)


@pytest.mark.parametrize("C", [1, 4, 17], ids=lambda c: f"C={c}")
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B={b}")
def test_kv_estimate_equals_allocation(tiny_model, B, C):
    # Exact, not approximate: the estimate mirrors moshi's allocation arithmetic tensor by tensor (ring caches,
    # offsets, exec masks) and CPU storages hold exactly numel * itemsize bytes, so any difference is a bug.
    estimate = estimate_run_bytes(tiny_model, B, C, max_length=64)
    assert estimate.kv_cache == allocated_state_bytes(tiny_model, B, C)


def test_kv_estimate_follows_the_run_dtype(tiny_model):
    # dtype= is the cast the run will do: estimated from the fp32 model, compared with a model built in bf16.
    bf16 = load_model("tiny", device="cpu", dtype=torch.bfloat16)
    estimate = estimate_run_bytes(tiny_model, 2, 4, 32, dtype=torch.bfloat16)
    assert estimate.kv_cache == allocated_state_bytes(bf16, 2, 4)
    assert estimate.weights == estimate_run_bytes(bf16, 2, 4, 32).weights
    assert estimate.weights < estimate_run_bytes(tiny_model, 2, 4, 32).weights


def test_moshi_7b_on_meta(moshi_7b_meta):
    one = estimate_run_bytes(moshi_7b_meta, 1, 1, max_length=3000)
    # KV per sequence at context 3000 in bf16 is 1.57 GB; the per-state offsets and masks add a few hundred bytes.
    assert 0 <= one.kv_cache - MOSHI_KV_PER_SEQUENCE < 1000
    assert one.weights == pytest.approx(15.4e9, rel=0.01)
    assert estimate_run_bytes(moshi_7b_meta, 1, 1, 3000, dtype=torch.float32).weights == pytest.approx(30.8e9, rel=0.01)
    b32 = estimate_run_bytes(moshi_7b_meta, 32, 1, max_length=45000)
    assert b32.kv_cache == pytest.approx(32 * MOSHI_KV_PER_SEQUENCE, rel=1e-6)  # 50 GB at B = 32
    # Chunk mode enlarges every ring to context + C - 1 slots.
    chunked = estimate_run_bytes(moshi_7b_meta, 1, 64, max_length=3000)
    assert chunked.kv_cache - MOSHI_KV_PER_SEQUENCE == pytest.approx(MOSHI_KV_PER_SEQUENCE * 63 / 3000, abs=1000)


def test_moshi_7b_batch_of_32_fits_an_h100(moshi_7b_meta):
    # B = 32 needs 50 GB beside 15.4 GB of weights, which an 80 GB H100 (79.1 GiB usable) must hold.
    h100 = int(79.1 * GiB)
    weights = estimate_run_bytes(moshi_7b_meta, 1, 1, 45000).weights
    assert pick_batch_size(moshi_7b_meta, 64, 1, 45000, h100 - weights) >= 32
    assert pick_batch_size(moshi_7b_meta, 64, 1, 45000, h100, weights_resident=False) >= 32
    with pytest.raises(PreflightError):  # but not on a 40 GB card
        check_fits(estimate_run_bytes(moshi_7b_meta, 32, 1, 45000), 40 * GiB - weights, "cuda_mem_get_info")


def test_estimate_grows_with_batch_and_chunk(tiny_model):
    base = estimate_run_bytes(tiny_model, 2, 1, 64)
    assert estimate_run_bytes(tiny_model, 4, 1, 64).run_bytes > base.run_bytes
    chunked = estimate_run_bytes(tiny_model, 2, 16, 64)
    assert chunked.kv_cache > base.kv_cache and chunked.activations > base.activations


def test_graph_margin_and_totals(tiny_model):
    plain = estimate_run_bytes(tiny_model, 2, 4, 64)
    graphed = estimate_run_bytes(tiny_model, 2, 4, 64, cuda_graphs=True)
    # The graph's private pool holds a second copy of the step's tensors; library workspaces are not doubled.
    assert plain.graph_margin == 0 and graphed.graph_margin == graphed.activations - RUNTIME_OVERHEAD > 0
    assert graphed.run_bytes == plain.run_bytes + graphed.graph_margin
    assert plain.total == plain.weights + plain.run_bytes
    report = json.loads(json.dumps(graphed.as_dict()))  # JSON-serializable for EvalResult.report
    assert report["total"] == graphed.total and report["run_bytes"] == graphed.run_bytes
    assert report["batch_size"] == 2 and report["chunk_size"] == 4 and report["max_length"] == 64


_MEASURE = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    from fused_stream.data.codes import generate_codes
    from fused_stream.core.config import EvalConfig
    from fused_stream.engine.driver import StreamingEvaluator
    from fused_stream.data.models import load_model

    B, C, T = (int(x) for x in sys.argv[1:4])
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def hwm():  # the kernel's exact peak RSS since the reset below
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    model = load_model("small", device="cpu", dtype=torch.float32)
    codes = generate_codes(model, B, T, seed=0)
    evaluator = StreamingEvaluator(model, EvalConfig(chunk_size=C, batch_size=B))
    try:  # "5" resets VmHWM to the current RSS: it then also catches peaks shorter than the sampling interval
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    base = peak = rss()
    done = threading.Event()

    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    evaluator.evaluate(codes)
    done.set()
    sampler.join()
    peak = max(peak, rss(), hwm() if exact else 0)
    print(json.dumps({"peak_increase": peak - base}))
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "B, C, T",
    [
        (8, 1, 64),  # frame mode, KV-dominated: torch.zeros touches every page of the rings, whatever T
        (2, 64, 256),  # chunk mode, activation-heavy: 128 frames of 32000 text + 8 x 2048 audio logits a step
    ],
)
def test_estimate_within_30_percent_of_measured_rss(B, C, T):
    # A fresh process, so no other test's memory (or allocator state) is in the measurement.
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(B), str(C), str(T)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase"]
    model = load_model("small", device="meta", dtype=torch.float32)
    estimate = estimate_run_bytes(model, B, C, T, device="cpu")
    print(f"B={B} C={C} T={T}: estimate {estimate.run_bytes / 1e6:.1f} MB {estimate.as_dict()}, "
          f"measured peak RSS increase {measured / 1e6:.1f} MB")
    assert estimate.run_bytes == pytest.approx(measured, rel=0.30)


def test_pick_batch_size(tiny_model):
    n, C, T = 50, 4, 128
    per_sequence = estimate_run_bytes(tiny_model, 2, C, T).run_bytes - estimate_run_bytes(tiny_model, 1, C, T).run_bytes
    one = estimate_run_bytes(tiny_model, 1, C, T).run_bytes
    small_limit = int((one + 5.5 * per_sequence) / 0.85)
    picked = pick_batch_size(tiny_model, n, C, T, small_limit)
    assert 1 < picked < n
    # The largest that fits: B fits, B + 1 does not.
    assert estimate_run_bytes(tiny_model, picked, C, T).run_bytes <= 0.85 * small_limit
    assert estimate_run_bytes(tiny_model, picked + 1, C, T).run_bytes > 0.85 * small_limit
    assert pick_batch_size(tiny_model, n, C, T, 100 * small_limit) > picked
    assert pick_batch_size(tiny_model, n, C, T, 10**15) == n  # never more than there are sequences
    assert pick_batch_size(tiny_model, 3, C, T, 10**15) == 3
    # Weights not yet resident count too.
    assert pick_batch_size(tiny_model, n, C, T, small_limit, weights_resident=False) < picked
    with pytest.raises(PreflightError, match="batch_size=1"):
        pick_batch_size(tiny_model, n, C, T, one // 2, source="meminfo")


def test_check_fits_message():
    estimate = MemoryEstimate(weights=int(15.4 * GiB), kv_cache=50 * GiB, activations=GiB // 2, buffers=GiB // 4,
                              graph_margin=0, batch_size=32, chunk_size=1, max_length=45000)
    check_fits(estimate, 70 * GiB, "cuda_mem_get_info")  # 50.75 GiB <= 0.85 * 70 GiB: fits, no error
    with pytest.raises(PreflightError) as info:
        check_fits(estimate, 40 * GiB, "cuda_mem_get_info")
    message = str(info.value)
    for part in ("batch_size=32", "~50.8 GiB", "KV cache 50.0 GiB", "activations 512.0 MiB", "buffers 256.0 MiB",
                 "only 40.0 GiB is free (cuda_mem_get_info)", "weights 15.4 GiB already resident",
                 "smaller batch_size", "chunk_size"):
        assert part in message, (part, message)
    with pytest.raises(PreflightError, match=r"needs ~66\.1 GiB \(weights 15\.4 GiB, KV cache"):
        check_fits(estimate, 70 * GiB, "meminfo", weights_resident=False)
    assert isinstance(info.value, MemoryError)


def test_available_bytes_cpu():
    available, source = available_bytes(torch.device("cpu"))
    # MemAvailable here; a container's cgroup limit takes over where it is the tighter one.
    assert source in ("meminfo", "cgroup")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    assert 0 < available <= total


@pytest.mark.gpu
def test_available_bytes_cuda():
    available, source = available_bytes(torch.device("cuda"))
    assert source == "cuda_mem_get_info"
    assert 0 < available <= torch.cuda.mem_get_info()[1]


def test_torch_loss_on_cuda_is_counted(moshi_7b_meta):
    """The loss path comes from the run's backend, not its device: the torch twin on CUDA allocates its fp32
    log-softmax of every logit and an fp32 copy of the bf16 logits, which the Triton kernel does not."""
    m, B, C = moshi_7b_meta, 4, 64
    kernel = estimate_run_bytes(m, B, C, 3000, loss_backend="triton")  # a meta model: planned for CUDA
    twin = estimate_run_bytes(m, B, C, 3000, device="cuda", loss_backend="torch")
    logits = B * C * (m.text_card + m.dep_q * m.card)
    # At B * C = 256 the output phase is the step's largest: bf16 text logits, the audio logits twice, then the
    # twin's 4 + 4 bytes per logit.
    output = B * C * (m.text_card + 2 * m.dep_q * m.card) * 2
    assert twin.activations == output + logits * 8 + RUNTIME_OVERHEAD
    assert kernel.activations < twin.activations  # its output phase lacks the 8 bytes per logit: another phase leads
    assert twin.run_bytes - kernel.run_bytes == twin.activations - kernel.activations
