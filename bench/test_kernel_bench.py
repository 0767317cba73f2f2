"""Per-step loss of the driver: the fused kernel (or its torch twin on CPU) vs a plain torch path.

A step of Moshi's shapes: B*C*8 audio rows of 2048 logits and B*C text rows of 32000. The plain path is what a
user writes: `F.cross_entropy(x.float(), reduction="none")` per stream, masking, an index write into the buffer.
On CPU only the twin and the plain path run (Triton's interpreter is not a speed path); on CUDA the kernel runs
too and `extra_info` records achieved GB/s (logit bytes read per second).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_stream.kernels import cross_entropy as ce

DEP_Q, CARD, TEXT_CARD = 8, 2048, 32000
SHAPES = [(8, 1), (8, 16)]  # (B, C)


def make_step(B: int, C: int, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    text = torch.randn(B, 1, C, TEXT_CARD, generator=g, device=device).to(dtype)
    audio = torch.randn(B, DEP_Q, C, CARD, generator=g, device=device).to(dtype)
    targets = torch.randint(0, CARD, (B, 1 + DEP_Q, C), generator=g, device=device)
    delays = torch.tensor([0, 0] + [1] * (DEP_Q - 1), device=device)
    lengths = torch.full((B,), 10_000, device=device)
    offset = torch.tensor(5, device=device)
    out = torch.full((B, 1 + DEP_Q, 1 + 10_000), float("nan"), device=device)
    counts = torch.zeros(ce.N_COUNTERS, dtype=torch.long, device=device)
    return text, audio, targets, delays, lengths, offset, out, counts


def plain_torch_step(text, audio, targets, delays, lengths, offset, out, counts, lead: int) -> None:
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


def _timed(fn, device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("path", ["fused", "plain_torch"])
def test_step_loss(benchmark, path, B, C):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = make_step(B, C, device)
    text, audio = args[0], args[1]
    if path == "fused":
        backend = "triton" if device.type == "cuda" else "torch"  # CPU: the twin (the interpreter is not a speed path)
        fn = _timed(lambda: ce.step_cross_entropy_(*args, lead=1, backend=backend), device)
    else:
        backend = "plain"
        fn = _timed(lambda: plain_torch_step(*args, lead=1), device)
    fn()  # warm-up: kernel compilation, allocator
    logit_bytes = text.numel() * text.element_size() + audio.numel() * audio.element_size()
    benchmark.extra_info.update(
        path=path, backend=backend, B=B, C=C, rows=B * C * (1 + DEP_Q), logit_bytes=logit_bytes,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=str(text.dtype),
    )
    benchmark.pedantic(fn, rounds=20 if device.type == "cuda" else 5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = logit_bytes / benchmark.stats.stats.median / 1e9
