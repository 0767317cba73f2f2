"""Preflight: the bytes a streaming run will need, estimated from the model's structure before any compute.

Everything here is arithmetic over module attributes and tensor metadata, so it works on a model on the `meta`
device (plan Moshi 7B without allocating its 15.4 GB) and costs nothing on a real one. The KV-cache term
reproduces moshi's allocations exactly (its ring caches and the small per-state tensors, counted by
`patches/streaming.py::predicted_state_bytes`); the activation term is a
model of one step's large transients, calibrated against measured peak RSS on CPU (see tests/test_preflight.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from moshi.models.lm import LMModel

from ..core.alignment import scored_delays
from ..errors import FusedStreamError
from ..kernels import backends as loss_backends
from ..patches.depformer import depformer_stack_bytes
from ..patches.streaming import predicted_state_bytes

GiB = 1024**3
# Per-run fixed cost outside any tensor we can name: compute-library workspaces. On CPU the first gemm of each
# shape allocates BLAS packing buffers (measured: ~10 MB in total for `small` at B = 1, C = 1 in a fresh process;
# they grow with layer width, so a CPU model 4x wider than `small` is underestimated by ~20 MB at small B * C).
# On CUDA, cuBLAS workspaces (up to 32 MiB on Hopper) go through torch's caching allocator. Noise beside a 7B model.
RUNTIME_OVERHEAD = 16 * 1024**2


@dataclass
class MemoryEstimate:
    weights: int  # parameters + buffers of the model, at the run's dtype
    kv_cache: int  # ring KV caches of B sequences at capacity context + C - 1, plus the small per-state tensors
    activations: int  # peak transient bytes of one step (logits, loss work, one layer's attention / FF)
    buffers: int  # codes, delayed codes, loss buffer, host copies of one batch, the stacked depformer weights
    graph_margin: int  # CUDA-graph private pool (0 without graphs)
    batch_size: int
    chunk_size: int
    max_length: int

    @property
    def total(self) -> int:
        return self.weights + self.run_bytes

    @property
    def run_bytes(self) -> int:
        """What the run adds on top of an already-resident model."""
        return self.kv_cache + self.activations + self.buffers + self.graph_margin

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"total": self.total, "run_bytes": self.run_bytes}


class PreflightError(FusedStreamError, MemoryError):
    """The run would not fit in the memory that is free; the message says what to change."""


def estimate_run_bytes(
    model: LMModel, batch_size: int, chunk_size: int, max_length: int, *, cuda_graphs: bool = False,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None, loss_backend: str = "auto",
) -> MemoryEstimate:
    """Bytes a `StreamingEvaluator` run of `batch_size` sequences of up to `max_length` frames needs.

    `dtype` is the dtype the run casts the model to (EvalConfig.dtype; None = as it is). `device` is where the
    run happens (default: the model's device; a `meta` model is taken to be planned for CUDA). `loss_backend`: the
    run's (Plan.loss_backend), whose record says what its step allocates; "auto" is resolved for the device.
    """
    if batch_size < 1 or chunk_size < 1 or max_length < 1:
        raise ValueError(f"batch_size, chunk_size and max_length must be >= 1, got {batch_size}, {chunk_size}, "
                         f"{max_length}")
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    on_cpu = run_device.type == "cpu"
    B, C = batch_size, chunk_size
    es = _itemsize(dtype or model.text_emb.weight.dtype)  # not text_linear: unfused LoRA replaces it
    weights = sum(_tensor_bytes(t, dtype) for t in (*model.parameters(), *model.buffers()))
    kv, capacity, heads = predicted_state_bytes(model, B, C, dtype)
    loss = _loss_backend(loss_backend, run_device)
    activations = _step_activations(model, B, C, es, capacity, heads, loss=loss, scores=not on_cpu)
    n_steps = math.ceil(max_length / C)
    L, K, channels = n_steps * C, model.num_codebooks, 1 + model.dep_q
    lead = max(scored_delays(model))
    buffers = (
        B * K * max_length * 8 * (1 if on_cpu else 2)  # padded codes [B, K, T] int64 (+ their device copy)
        + 2 * B * K * (L + 1) * 8  # delayed codes [B, K, L + 1] int64: built, then copied into the step's buffer
        + B * channels * (lead + L + 1) * 4  # loss buffer [B, 1 + dep_q, lead + L + 1] fp32
        + B * channels * max_length * (4 + 4 + 1)  # host copy, result rows (fp32) and valid masks (bool)
        + depformer_stack_bytes(model, dtype)  # the Stream's stacked copy of the depformer's weights
    )
    # A captured graph keeps its own private pool holding every intermediate of the step for as long as the
    # graph lives, while the eager warm-up run before capture leaves the same intermediates cached in the main
    # pool: about one more step's activations (library workspaces are shared, not doubled).
    graph_margin = activations - RUNTIME_OVERHEAD if cuda_graphs else 0
    return MemoryEstimate(weights, kv, activations, buffers, graph_margin, B, C, max_length)


def _loss_backend(name: str, device: torch.device) -> loss_backends.LossBackend:
    if device.type == "meta":  # planned for a GPU elsewhere: what this process can run does not decide
        return loss_backends.loss_backend(loss_backends.resolve_backend(name, torch.device("cuda"), planned=True))
    return loss_backends.loss_backend(loss_backends.resolve_backend(name, device))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    # `model.to(dtype=...)` casts floating parameters and buffers only; integer buffers keep their size.
    size = _itemsize(dtype) if dtype is not None and t.is_floating_point() else t.element_size()
    return t.numel() * size


def _linear_outputs(layer: torch.nn.Module) -> int:
    """Output features a token produces through one layer's linears (one copy of per-step weights)."""
    total = sum(m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
    attn = getattr(layer, "self_attn", None)
    return total // max(1, getattr(attn, "mult", 1))


def _step_activations(
    model: LMModel, B: int, C: int, es: int, capacity: int, heads: int, *, loss: loss_backends.LossBackend, scores: bool
) -> int:
    """Peak transient bytes of one step: the largest of its three phases, each counted as the *sum* of its
    tensors rather than their largest live set.

    Why a sum within a phase: a freed block stays with the allocator (glibc's heap on CPU, the caching allocator
    on CUDA) and a differently sized tensor rarely fits it, so the high-water mark approaches the sum. Why a max
    across phases: the phases run one after the other with similar tensors, so a later phase refills the blocks
    an earlier one freed. Measured on CPU (`small`, fp32, peak RSS): +0.46 MB per frame of B * C, where the
    output phase sums to 0.45 (its largest live set is 0.32); with a 4x wider depformer, +0.52 measured against
    0.54 estimated for the depformer phase (a sum across phases would say 1.1).
    """
    N = B * C  # frames per step
    text = N * model.text_linear.out_features * es  # text logits [B, 1, C, text_card], live from forward_text on
    # 1. One temporal layer at a time: the attention mask chain over the ring (int64 deltas [B, C, cap], four
    # bool temporaries, the mask cast to the compute dtype for SDPA) and, off the CPU, a score matrix
    # [B, heads, C, cap] in case SDPA falls back to its math kernel (CPU's flash kernel tiles the scores);
    # plus the hidden states and every linear's output (twice: output and one elementwise temporary).
    attn = N * capacity * (8 + 4 + es + (heads * es if scores else 0))
    layer = attn + N * es * (4 * model.dim + 2 * max((_linear_outputs(x) for x in model.transformer.layers),
                                                      default=0))
    # 2. The depformer, non-streaming over dep_q tokens per frame, beside the text logits and transformer_out:
    # its inputs (projection, embedding, sum, stack) and one layer's linear outputs; attention over dep_q tokens
    # is negligible.
    depformer = 0
    if model.depformer is not None:
        tokens, dep_dim = N * model.dep_q, model.depformer_in[0].out_features
        dep_layer = max((_linear_outputs(x) for x in model.depformer.layers), default=0)
        depformer = text + N * model.dim * es + tokens * es * (4 * dep_dim + 2 * dep_layer)
    # 3. Outputs and loss: audio logits twice (the per-codebook list and their torch.stack), and what the loss
    # backend allocates over them (its record says: the torch twin's fp32 log-softmax, none for the Triton kernel).
    audio_rows = N * model.dep_q * model.card
    output = text + 2 * audio_rows * es + loss.extra_bytes(N * model.text_linear.out_features + audio_rows, es)
    return max(layer, depformer, output) + RUNTIME_OVERHEAD


def available_bytes(device: torch.device | str) -> tuple[int, str]:
    """(bytes free for a run on `device`, where that number came from).

    CUDA: `torch.cuda.mem_get_info` free bytes plus blocks torch's caching allocator already holds but does not
    use (this process can reuse them; they are not "free" to the driver). CPU: MemAvailable from /proc/meminfo,
    or the container's cgroup limit minus its usage when that is smaller (MemAvailable shows the host's memory,
    not a container's), or sysconf pages where /proc is missing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached)), "cuda_mem_get_info"
    if device.type != "cpu":
        raise ValueError(f"no way to query free memory on a {device.type!r} device")
    available, source = None, "meminfo"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024  # the file says kB; it means KiB
                    break
    except OSError:
        pass
    if available is None:
        available, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf"
    limited = _cgroup_available()
    if limited is not None and limited < available:
        available, source = limited, "cgroup"
    return available, source


def _cgroup_available() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1), or None where there is no limit. Inactive
    page cache counts as available (the kernel drops it before the OOM killer acts), as `docker stats` does."""
    for root, limit_name, usage_name in (("/sys/fs/cgroup", "memory.max", "memory.current"),
                                         ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")):
        try:
            with open(f"{root}/{limit_name}") as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 2**62:  # v1 writes "no limit" as a page-rounded 2^63 - 1
                return None
            with open(f"{root}/{usage_name}") as f:
                usage = int(f.read())
            with open(f"{root}/memory.stat") as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - usage + int(stat.get("inactive_file", 0)))
    return None


def _fmt(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def check_fits(
    estimate: MemoryEstimate, available: int, source: str, *, safety: float = 0.85, weights_resident: bool = True
) -> None:
    """Raise PreflightError unless the run fits in `safety * available` bytes.

    `weights_resident`: the model is already loaded where `available` was measured, so its weights are not
    counted again (free memory already excludes them).
    """
    need = estimate.run_bytes if weights_resident else estimate.total
    if need <= safety * available:
        return
    parts = [f"KV cache {_fmt(estimate.kv_cache)}", f"activations {_fmt(estimate.activations)}",
             f"buffers {_fmt(estimate.buffers)}"]
    if estimate.graph_margin:
        parts.append(f"CUDA-graph margin {_fmt(estimate.graph_margin)}")
    weights = f"weights {_fmt(estimate.weights)}"
    parts = parts + [f"{weights} already resident, not counted"] if weights_resident else [weights] + parts
    raise PreflightError(
        f"batch_size={estimate.batch_size}, chunk_size={estimate.chunk_size}, max_length={estimate.max_length} "
        f"needs ~{_fmt(need)} ({', '.join(parts)}) but only {_fmt(available)} is free ({source}); with the safety "
        f"factor {safety:g} the limit is {_fmt(int(safety * available))}. Use a smaller batch_size (or "
        f"batch_size='auto') or a smaller chunk_size, or free memory on the device."
    )


def pick_batch_size(
    model: LMModel, n_sequences: int, chunk_size: int, max_length: int, available: int, *, safety: float = 0.85,
    cuda_graphs: bool = False, weights_resident: bool = True, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, source: str = "given limit", loss_backend: str = "auto",
) -> int:
    """The largest B in [1, n_sequences] whose estimate fits in `safety * available`; PreflightError if B = 1
    does not fit (check_fits' message for B = 1; `source` says where `available` came from)."""
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")

    def estimate(B: int) -> MemoryEstimate:
        return estimate_run_bytes(model, B, chunk_size, max_length, cuda_graphs=cuda_graphs, dtype=dtype,
                                  device=device, loss_backend=loss_backend)

    check_fits(estimate(1), available, source, safety=safety, weights_resident=weights_resident)
    # Every term grows with B, so bisect: the largest B that fits lies in [lo, hi].
    lo, hi = 1, n_sequences
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = estimate(mid)
        if (need.run_bytes if weights_resident else need.total) <= safety * available:
            lo = mid
        else:
            hi = mid - 1
    return lo
