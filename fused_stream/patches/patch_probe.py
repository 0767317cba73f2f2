"""Each patch of a moshi instance accepted by what it computes, not by a version string.

When a Stream opens, each patch it would install (the ring cut, `ring_attention.RingAttention`; the attention
step, `attention_step.AttentionStep`; the stacked depformer, `depformer.StackedDepformer`) is first run beside
moshi's own code on a small probe with the instance's geometry, and installed only if it reproduces moshi's result:

- ring cut and attention step: two attentions of the instance's class and settings (context, chunk, RoPE,
  kv_repeat, head width, dtype, device; two KV heads, random weights) in streaming mode on a ring of a small
  context enlarged for the chunk as `stream.enlarge_kv_caches` does, streamed past two wraps of that ring, at chunk
  1 and at the stream's chunk. The ring cut attends over fill buckets as `RingSteps` does and must match moshi's
  whole-ring forward up to float reassociation (its documented claim); the attention step must equal moshi's
  forward (with the ring cut when that was accepted), outputs, rings and offsets, bit for bit (`torch.equal`);
- stacked depformer: the instance's own weights on a few random frames must match moshi's
  `forward_depformer_training` up to float rounding (its documented claim: bit for bit where measured, rounding in
  bf16).

A patch that does not reproduce moshi is not installed (moshi's code runs) and `Verdict.reason` says why; the
Stream reports every verdict (`Stream.patches`, the run's `report["patches"]`). A verdict is cached per (patch,
class, geometry, and the moshi functions the patch stands in for), so a run probes once, not per batch, and a
changed moshi function (another release, a monkeypatch) is probed again.
"""

from __future__ import annotations

import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingContainer
from moshi.modules.transformer import (
    RingKVCache,
    StreamingMultiheadAttention,
    StreamingTransformer,
    StreamingTransformerLayer,
)
from torch import nn

from .attention_step import AttentionStep
from .ring_attention import RingAttention, fill_buckets

__all__ = ["PATCHES", "Verdict", "accept_attention_step", "accept_ring_cut", "accept_stacked_depformer",
           "clear_verdicts"]

PATCHES = frozenset({"ring_cut", "attention_step", "stacked_depformer"})
PROBE_CONTEXT = 3  # the probe ring's context: small, so a few steps wrap it twice
PROBE_BATCH = 2
PROBE_FRAMES = 4  # depformer probe: frames per sequence at most
ROUNDING_EPS = 16  # tolerance of "up to float rounding": this many machine epsilons of the output's scale


@dataclass(frozen=True)
class Verdict:
    """Whether a patch reproduces moshi on an instance's geometry, why not, and what the probe cost."""

    patch: str
    accepted: bool
    reason: str | None = None  # why not installed (None when accepted)
    probe_seconds: float = 0.0  # this call's probe time (0 when cached or not probed)
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"installed": self.accepted, "reason": self.reason, "probe_seconds": self.probe_seconds,
                "cached": self.cached}


_VERDICTS: dict[tuple[Any, ...], Verdict] = {}


def clear_verdicts() -> None:
    """Forget every cached verdict (the next Stream probes again)."""
    _VERDICTS.clear()


def _moshi_code() -> tuple[Callable[..., Any], ...]:
    """The moshi functions the patches stand in for: part of every cache key, so a changed one is probed again."""
    return (StreamingMultiheadAttention.forward, StreamingMultiheadAttention._complete_kv, RingKVCache.complete,
            StreamingTransformer.forward, StreamingTransformerLayer.forward, ActivationGating.forward,
            LMModel.forward_depformer_training)


def _decide(patch: str, key: tuple[Any, ...], probe: Callable[[], str | None]) -> Verdict:
    key = (patch, *key, _moshi_code())
    if key in _VERDICTS:
        return replace(_VERDICTS[key], probe_seconds=0.0, cached=True)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            reason = probe()
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise  # not a verdict: the driver's out-of-memory handling retries smaller, and nothing is cached
    except Exception as exc:  # noqa: BLE001 - a patch that cannot even run on the probe is not used
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    verdict = Verdict(patch, reason is None, reason, time.perf_counter() - start)
    _VERDICTS[key] = verdict
    return verdict


def _ring_tensor(module: StreamingMultiheadAttention) -> torch.Tensor:
    """The module's ring: its dtype and device are the attention's (whatever its linears are: LoRA, quantized)."""
    return module._streaming_state.kv_cache.cache


def _geometry(module: StreamingMultiheadAttention, chunk: int) -> tuple[Any, ...]:
    ring = _ring_tensor(module)
    rope = (module.rope.max_period, module.rope.interleave) if module.rope is not None else None
    return (type(module), chunk, module.context is None, rope, module.kv_repeat, module.embed_dim // module.num_heads,
            module.weights_per_step, tuple(module.weights_per_step_schedule or ()),
            module._streaming_state.kv_cache.respect_exec_mask, ring.dtype, ring.device)


def accept_ring_cut(modules: list[StreamingMultiheadAttention], chunk: int) -> Verdict:
    """Whether attending over the first ring slots (`RingAttention`, fill buckets) matches moshi's whole ring."""
    if not modules:
        return Verdict("ring_cut", False, "no ring attention in the temporal transformer")
    return _decide("ring_cut", _geometry(modules[0], chunk), lambda: _probe_attention(modules[0], chunk, "ring_cut"))


def accept_attention_step(modules: list[StreamingMultiheadAttention], chunk: int, cut: bool) -> Verdict:
    """Whether `AttentionStep` equals moshi's forward (with the ring cut when `cut`), bit for bit."""
    if len(modules) < 2:
        return Verdict("attention_step", False, "fewer than two ring attentions: nothing to share")
    return _decide("attention_step", (*_geometry(modules[0], chunk), cut),
                   lambda: _probe_attention(modules[0], chunk, "attention_step", cut=cut))


def accept_stacked_depformer(model: LMModel, stacked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             chunk: int) -> Verdict:
    """Whether `stacked` (a `StackedDepformer` of `model`) matches moshi's depformer on `model`'s own weights."""
    weight = model.depformer_in[0].weight
    key = (type(model), id(model), chunk, weight.dtype, weight.device)
    return _decide("stacked_depformer", key, lambda: _probe_depformer(model, stacked, chunk))


# ------------------------------------------------------------------------------------------------------ probes


def _mismatch(got: torch.Tensor, expected: torch.Tensor, exact: bool) -> str | None:
    """None when `got` reproduces `expected` (bit for bit, or up to float rounding); else how far off (host reads:
    the probe runs when a Stream opens, outside any step loop)."""
    got, expected = got.float().nan_to_num(0.0), expected.float().nan_to_num(0.0)
    if exact:
        return None if torch.equal(got, expected) else f"differ by up to {(got - expected).abs().max().item():.3g}"
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    tolerance = ROUNDING_EPS * torch.finfo(expected.dtype).eps * scale
    return None if error <= tolerance else f"differ by up to {error:.3g} (rounding allows {tolerance:.3g})"


class _ProbeModel(nn.Module):
    """Two probe attentions where `RingAttention` looks for them (`model.transformer`)."""

    def __init__(self, layers: list[StreamingMultiheadAttention]) -> None:
        super().__init__()
        self.transformer = StreamingContainer()
        self.transformer.layers = nn.ModuleList(layers)


def _probe_layers(like: StreamingMultiheadAttention) -> list[StreamingMultiheadAttention]:
    ring = _ring_tensor(like)
    heads = 2 * like.kv_repeat
    head_dim = like.embed_dim // like.num_heads
    return [type(like)(heads * head_dim, heads, causal=True,
                       context=None if like.context is None else PROBE_CONTEXT, rope=like.rope,
                       kv_repeat=like.kv_repeat, weights_per_step=like.weights_per_step,
                       weights_per_step_schedule=like.weights_per_step_schedule,
                       device=ring.device, dtype=ring.dtype).eval() for _ in range(2)]


@contextlib.contextmanager
def _seeded(device: torch.device):
    """A fixed seed inside, the caller's random state untouched after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(0)
        yield


def _probe_attention(like: StreamingMultiheadAttention, chunk: int, patch: str, cut: bool = False) -> str | None:
    """Stream two probe attentions with moshi's forward and with the patch; None when the patch reproduces it."""
    device = _ring_tensor(like).device
    for frames_per_step in sorted({1, chunk}):
        with _seeded(device):
            layers = _probe_layers(like)
            model = _ProbeModel(layers)
            capacity = _ring_capacity(model, frames_per_step)
            steps = math.ceil((2 * capacity + 1) / frames_per_step) + 1  # past two wraps of the ring
            inputs = torch.randn(steps, PROBE_BATCH, frames_per_step, layers[0].embed_dim, device=device,
                                 dtype=_ring_tensor(like).dtype)
        # The cut of each step, as `RingSteps` chooses it: its fill rounded up to a bucket (None: the whole ring).
        buckets = fill_buckets(capacity, steps * frames_per_step, frames_per_step, max_buckets=2)
        cuts = [buckets[min(bisect_left(buckets, (s + 1) * frames_per_step,
                                        key=lambda b: math.inf if b is None else b), len(buckets) - 1)]
                for s in range(steps)]
        if patch == "ring_cut":
            expected = _stream(model, inputs, frames_per_step, cuts=None, cut=False, step=False)
            got = _stream(model, inputs, frames_per_step, cuts=cuts, cut=True, step=False)
            exact = False
        else:
            expected = _stream(model, inputs, frames_per_step, cuts=cuts, cut=cut, step=False)
            got = _stream(model, inputs, frames_per_step, cuts=cuts, cut=cut, step=True)
            exact = True
        for name, a, b in zip(("outputs", "rings", "offsets"), got, expected, strict=True):
            wrong = _mismatch(a, b, exact)
            if wrong is not None:
                return (f"{name} {wrong} from moshi's StreamingMultiheadAttention (chunk {frames_per_step}, "
                        f"ring of {capacity} slots, {steps} steps)")
    return None


def _ring_capacity(model: _ProbeModel, chunk: int) -> int:
    with model.transformer.streaming(PROBE_BATCH):
        _enlarge(model, chunk)
        return max(m._streaming_state.kv_cache.capacity for m in model.transformer.layers)


def _enlarge(model: _ProbeModel, chunk: int) -> None:
    """As `stream.enlarge_kv_caches`: context + chunk - 1 slots (a chunk's keys land before its queries attend)."""
    for module in model.transformer.layers:
        state = module._streaming_state
        if chunk > 1 and module.context is not None:
            old = state.kv_cache
            state.kv_cache = RingKVCache(PROBE_BATCH, old.cache.shape[2], old.cache.shape[4],
                                         module.context + chunk - 1, respect_exec_mask=old.respect_exec_mask,
                                         device=old.cache.device, dtype=old.cache.dtype)


def _stream(model: _ProbeModel, inputs: torch.Tensor, chunk: int, cuts: list[int | None] | None, cut: bool,
            step: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outputs of every step [steps, B, C, E], both rings after, both offsets after) of the two layers in turn."""
    layers = model.transformer.layers
    outputs = []
    with model.transformer.streaming(PROBE_BATCH), contextlib.ExitStack() as patches:
        _enlarge(model, chunk)
        attention = RingAttention(model)
        attention.cutting = cut
        patches.enter_context(attention)
        if step:
            if not patches.enter_context(AttentionStep(attention)).installed:
                raise RuntimeError("AttentionStep did not install on two identical probe layers")
        for s, x in enumerate(inputs):
            with attention.attending(None if cuts is None else cuts[s]):
                for layer in layers:
                    x = layer(x, x, x)
            outputs.append(x)
        states = [layer._streaming_state for layer in layers]
        rings = torch.stack([state.kv_cache.cache for state in states])
        offsets = torch.stack([torch.cat([state.offset, state.kv_cache.end_offset]) for state in states])
        return torch.stack(outputs), rings, offsets


def _probe_depformer(model: LMModel, stacked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     chunk: int) -> str | None:
    device = model.depformer_in[0].weight.device
    frames = min(chunk, PROBE_FRAMES)
    generator = torch.Generator(device=device).manual_seed(0)
    text = torch.randint(0, model.text_card, (PROBE_BATCH, 1, frames), device=device, generator=generator)
    audio = torch.randint(0, model.card, (PROBE_BATCH, model.num_codebooks - 1, frames), device=device,
                          generator=generator)
    sequence = torch.cat([text, audio], dim=1)
    sequence[0, 0, 0] = model.zero_token_id  # a zero token (embedded as exact zeros)
    sequence[-1, 1, -1] = model.initial_token_id
    out = torch.randn(PROBE_BATCH, frames, model.dim, device=device, generator=generator,
                      dtype=model.depformer_in[0].weight.dtype)
    wrong = _mismatch(stacked(sequence, out), model.forward_depformer_training(sequence, out), exact=False)
    return None if wrong is None else f"logits {wrong} from moshi's forward_depformer_training"
