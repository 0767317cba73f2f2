"""One step's loss at Moshi's shapes, the plain torch path it replaces, and a timer that measures the GPU's work.

`time_per_call` times a loop of calls with no host sync between them (CUDA events on the GPU, recorded on the
current stream) and doubles the loop until it covers `min_seconds` of work: a sync after each 0.8 MB call would
measure the launch latency, not the kernel. Shared by gpu_check's bandwidth check and bench/test_kernel_bench.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import cross_entropy as ce


def time_per_call(fn: Callable[[], Any], device: torch.device, min_seconds: float = 0.1,
                  max_calls: int = 100_000) -> tuple[float, int]:
    """(seconds per call, calls timed): a warm-up call (compilation, allocator), then loops of calls, each timed as
    a whole, growing until one covers `min_seconds`."""
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    calls = 1
    while True:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3  # ms -> s
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - begin
        if elapsed >= min_seconds or calls >= max_calls:
            return elapsed / calls, calls
        calls = min(max_calls, max(2 * calls, math.ceil(1.2 * calls * min_seconds / max(elapsed, 1e-9))))


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
