"""The temporal transformer's attention step: the step's geometry built once, then applied in every layer.

What a causal self-attention over a ring of keys computes in one streaming step of T frames, for sequences at
positions [offset, offset + T):

- geometry, which depends only on the step's offsets, the ring's capacity and the context, so every layer of a
  stream shares it (all layers advance together under the same `exec_mask` and are rewound together by
  `reset_streaming`): the slot each new key lands in ((frames written + t) mod capacity), the position each slot
  holds once they have landed (-1 for a slot never written), which (query, slot) pairs may attend (the slot holds a
  key, at most `context - 1` frames before the query and not after it), and the RoPE angles of the T positions;
- per layer: project, rotate q and k by the angles, write k and v into the layer's own ring, attend over the ring's
  first `frames` slots (`ring_attention.RingAttention.frames`; all of them when None) under the mask, project out,
  and advance the layer's offsets.

`AttentionStep` installs `_LayerStep` as the `forward` of each attention of a `RingAttention` (same instances,
per instance). The first layer of the model (the "leader", first in every step) builds a `StepGeometry`; the
others apply it. The float computations keep moshi's results bit for bit (`patches/patch_probe.py` checks it on each
instance's geometry when a Stream opens, and the patch is not used otherwise):

- the RoPE angle of frequency i at time t is exp(i * (-2 log(max_period) / D)) * t in float32, and a pair (a, b)
  turns into (a cos - b sin, a sin + b cos) in float32, cast back: the same float expression per element as
  moshi's `apply_rope`. Only when that runs eagerly (compile disabled, as on CPU): compiled, it is one fused kernel
  whose rounding may differ from eager ops, so then each layer calls the module's own rope;
- projections, SDPA and the head split/merge are the same calls on tensors of the same strides;
- ring slots, positions, masks and offsets are integers and booleans: exact whatever the formula.

Graph safety: nothing is keyed by a host counter. The leader rebuilds the geometry on every call and stores it as a
Python attribute of the shared `AttentionStep`; under a CUDA graph the capture records the leader's kernels writing
it and the followers reading it, so every replay rebuilds it before use. A follower called before the leader in a
step would read the previous step's geometry (same shapes), so the leader lists the followers still due each step
and a follower not on that list raises. `AttentionStep` and `_LayerStep` are callables or plain holders, which the
graph-safety snapshot does not walk (as `ring_attention._Truncated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import moshi.modules.rope as moshi_rope
import moshi.utils.compile as moshi_compile
import torch
from moshi.modules.transformer import StreamingMultiheadAttention, apply_weights_per_step, expand_repeated_kv
from torch.nn import functional as F

from .shadows import InstanceShadows

__all__ = ["AttentionStep", "StepGeometry", "layer_signature"]


@dataclass
class StepGeometry:
    """What every layer of one step shares, built by the leader (see the module docstring)."""

    write_index: torch.Tensor  # [B, H, T, D] per-sequence ring slot of each new key (scatter), or [T] (index_copy)
    end_offset: torch.Tensor  # [B] or [1]: frames written into each ring after the step
    offset: torch.Tensor  # [B]: each sequence's position after the step
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [B, 1, T, D // 2]; None: the module's rope runs
    allowed: torch.Tensor  # [B, 1, T, frames] bool: which slots each query attends
    shape: tuple[int, int, int | None]  # (B, T, frames) it was built for: a host-side check


def layer_signature(module: StreamingMultiheadAttention) -> tuple[Any, ...]:
    """What layers must agree on to share a geometry: ring layout, context, RoPE, heads and widths."""
    ring = module._streaming_state.kv_cache
    rope = (module.rope.max_period, module.rope.interleave) if module.rope is not None else None
    return (ring.capacity, ring.respect_exec_mask, tuple(ring.cache.shape), ring.cache.dtype, module.context, rope,
            module.num_heads, module.kv_repeat, module.embed_dim)


class AttentionStep:
    """Installs `_LayerStep` on the attentions of a `ring_attention.RingAttention` (its modules, its `frames`).

    Installed only when every layer has the same `layer_signature` and there are at least two (one layer shares
    nothing); otherwise each module keeps its own forward. Whether the step reproduces moshi on an instance is
    decided before, by `patches/patch_probe.py`: this class does not check it.
    """

    def __init__(self, attention: Any) -> None:
        self.attention = attention  # ring_attention.RingAttention
        self._shadows = InstanceShadows("forward")
        self.geometry: StepGeometry | None = None  # this step's, rebound by every leader call
        self.due: set[int] = set()  # followers that have not yet read this step's geometry (host-side)

    def applicable(self) -> bool:
        modules = self.attention.modules
        return len(modules) >= 2 and len({layer_signature(m) for m in modules}) == 1

    def install(self) -> None:
        if self._shadows:
            raise RuntimeError("AttentionStep is already installed")
        if self.applicable():
            self._shadows.install({module: _LayerStep(self, module, layer)
                                   for layer, module in enumerate(self.attention.modules)})

    @property
    def installed(self) -> bool:
        return bool(self._shadows)

    def uninstall(self) -> None:
        self._shadows.restore()
        self.geometry, self.due = None, set()

    def __enter__(self) -> AttentionStep:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def frames(self, module: StreamingMultiheadAttention) -> int | None:
        """Slots attended this call: the `RingAttention`'s cut, None (the whole ring) once it covers the ring."""
        frames = self.attention.frames
        return None if frames is None or frames >= module._streaming_state.kv_cache.capacity else frames


def _rope_runs_eagerly() -> bool:
    """Whether moshi's `apply_rope` runs eagerly now: `torch_compile_lazy` returned it unwrapped (NO_TORCH_COMPILE
    set when moshi was imported), or its wrapper falls back to it (`no_compile()`, as `runtime.inference_mode` on
    CPU)."""
    return not hasattr(moshi_rope.apply_rope, "__wrapped__") or moshi_compile._compile_disabled


class _LayerStep:
    """One temporal attention's streaming forward(query, key, value) -> [B, T, embed_dim] with the step's geometry.
    A callable object, not a closure, so the graph-safety snapshot skips it."""

    def __init__(self, step: AttentionStep, module: StreamingMultiheadAttention, layer: int) -> None:
        self.step, self.module, self.layer = step, module, layer

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        module, step = self.module, self.step
        state = module._streaming_state
        ring = state.kv_cache
        batch, frames_in = query.shape[:2]
        q, k, v = _heads(module, apply_weights_per_step(module.in_projs, module.weights_per_step_schedule, query,
                                                        state.offset_cpu))
        attended = step.frames(module)
        if self.layer == 0:
            step.geometry = _build(module, k, state.offset, state.exec_mask, attended)
            step.due = set(range(1, len(step.attention.modules)))
        elif self.layer not in step.due or step.geometry.shape != (batch, frames_in, attended):
            raise RuntimeError(f"attention_step: temporal attention layer {self.layer} ran before its leader "
                               "(layer 0) in this step: it would reuse the previous step's RoPE angles, ring "
                               "indices and mask")
        else:
            step.due.discard(self.layer)
        geometry = step.geometry
        if geometry.rope is not None:
            cos, sin = geometry.rope
            interleave = module.rope.interleave
            q, k = _rotate(q, cos, sin, interleave), _rotate(k, cos, sin, interleave)
        elif module.rope:
            q, k = module.rope(q, k, state.offset, time_before_heads=False)
        # This layer's own ring, written at the shared slots; its end offset set to the shared value.
        for stored, new in ((ring.cache[0], k), (ring.cache[1], v)):
            if ring.respect_exec_mask:
                stored.scatter_(2, geometry.write_index, new)
            else:
                stored.index_copy_(2, geometry.write_index, new)
        ring.end_offset.copy_(geometry.end_offset)
        keys, values = ring.cache[0], ring.cache[1]
        if attended is not None:  # the first `attended` slots (views), as `ring_attention._Truncated`
            keys, values = keys[:, :, :attended], values[:, :, :attended]
        if module.kv_repeat > 1:
            keys, values = expand_repeated_kv(keys, module.kv_repeat), expand_repeated_kv(values, module.kv_repeat)
        x = F.scaled_dot_product_attention(q, keys, values, geometry.allowed, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(batch, frames_in, -1)  # [B, T, H * D]
        x = apply_weights_per_step(module.out_projs, module.weights_per_step_schedule, x, state.offset_cpu)
        state.offset.copy_(geometry.offset)
        state.offset_cpu += frames_in
        return x


def _heads(module: StreamingMultiheadAttention,
           projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k and v [B, H / kv_repeat, T, D]: views of the in-projection's output [B, T, ...]."""
    batch, frames_in, _ = projected.shape
    heads, width = module.num_heads, module.embed_dim
    head_dim = width // heads
    if module.kv_repeat == 1:
        q, k, v = projected.view(batch, frames_in, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v
    q = projected[:, :, :width].view(batch, frames_in, heads, head_dim).transpose(1, 2)
    kv_heads = heads // module.kv_repeat
    k, v = projected[:, :, width:].view(batch, frames_in, 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def _build(module: StreamingMultiheadAttention, k: torch.Tensor, offset: torch.Tensor, exec_mask: torch.Tensor,
           attended: int | None) -> StepGeometry:
    """The leader's geometry of this step, from its ring (before the step's writes) and its offsets."""
    ring = module._streaming_state.kv_cache
    capacity, written = ring.capacity, ring.end_offset  # written: frames in each ring so far, [B] or [1]
    batch, kv_heads, frames_in, head_dim = k.shape
    device = written.device
    steps = torch.arange(frames_in, device=device, dtype=written.dtype)
    slots_written = (written.view(-1, 1) + steps) % capacity  # [B or 1, T]
    if ring.respect_exec_mask:
        write_index = slots_written.view(batch, 1, frames_in, 1).expand(-1, kv_heads, -1, head_dim)
        written_after = torch.where(exec_mask, written + frames_in, written)
    else:
        write_index, written_after = slots_written[0], written + frames_in
    # Slot s holds the latest position p <= last with p = s (mod capacity); a slot past the frames written, none.
    slots = torch.arange(capacity, device=device, dtype=torch.long)
    last = written.view(-1, 1) + (frames_in - 1)
    positions = last - (last - slots) % capacity  # [B or 1, capacity]
    positions = positions.masked_fill(slots >= written_after.view(-1, 1), -1)
    if attended is not None:
        positions = positions[:, :attended]
    # Query t of sequence b sits at offset[b] + t; it sees the keys 0 .. context - 1 frames before it.
    key_positions = positions[:, None]  # [B or 1, 1, frames]
    query_positions = offset.view(-1, 1, 1) + torch.arange(frames_in, device=device, dtype=torch.long).view(-1, 1)
    age = query_positions - key_positions  # [B, T, frames]
    allowed = (key_positions >= 0) & (age >= 0)
    if module.context is not None:
        allowed = allowed & (age < module.context)
    rope = _angles(module, offset, frames_in) if module.rope and _rope_runs_eagerly() else None
    return StepGeometry(write_index=write_index, end_offset=written_after,
                        offset=torch.where(exec_mask, offset + frames_in, offset), rope=rope,
                        allowed=allowed[:, None], shape=(batch, frames_in, attended))


def _angles(module: StreamingMultiheadAttention, offset: torch.Tensor,
            frames_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, D // 2] float32 of the RoPE angles of positions offset + t (moshi's float formula)."""
    head_dim = module.embed_dim // module.num_heads
    device = offset.device
    exponent = -math.log(module.rope.max_period) * 2 / head_dim
    frequencies = torch.exp(torch.arange(head_dim // 2, device=device, dtype=torch.float32) * exponent)
    times = offset.float().view(-1, 1) + torch.arange(frames_in, device=device, dtype=torch.float32)
    angles = frequencies * times.view(offset.shape[0], 1, frames_in, 1)
    return torch.cos(angles), torch.sin(angles)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, H, T, D] with each pair (a, b) of its last dim turned by the angle: (a cos - b sin, a sin + b cos),
    in float32, cast back. Pairs are adjacent (interleave) or the two halves."""
    head_dim = x.shape[-1]
    if interleave:
        pairs = x.view(*x.shape[:-1], head_dim // 2, 2)
        a, b = pairs[..., 0].float(), pairs[..., 1].float()
    else:
        a, b = x[..., : head_dim // 2].float(), x[..., head_dim // 2:].float()
    turned_a, turned_b = (a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)
    if interleave:
        return torch.stack([turned_a, turned_b], dim=-1).view(*x.shape)
    return torch.cat([turned_a, turned_b], dim=-1)
