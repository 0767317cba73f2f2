"""Per-step work shared by the temporal transformer's ring attentions: RoPE angles, ring indices and positions, mask.

Why: each of Moshi's 32 temporal attention layers rebuilds, every step, the same RoPE cos/sin for positions
[offset, offset + T) (moshi/modules/rope.py `apply_rope`), the same ring write indices and slot positions
(`RingKVCache.complete`) and the same causal/context mask (`StreamingMultiheadAttention.forward`): ~50 aten ops a
layer that depend only on the offsets, the ring capacity and the context, which every layer of a stream shares
(moshi advances every layer's `offset` and `end_offset` by the same T under the same `exec_mask`, and
`reset_streaming` rewinds them all). `SharedStep` shadows, per instance, the `forward` of each attention that
`RingAttention` handles with `_SharedForward`: moshi's forward, line for line, except that the first layer (the
"leader", first in the model's layer order, so first in every step) computes those tensors and the others reuse
them. Every float op on the data path keeps moshi's formula, dtypes and order, so results are bit-identical:

- RoPE: `freqs * ts` is computed once and its cos/sin reused (moshi computes the same product twice); q and k are
  rotated with moshi's expressions, elementwise, so each output element is the same float expression. Only when
  moshi's `apply_rope` runs eagerly (compile disabled, as on CPU): a compiled `apply_rope` is one fused kernel whose
  rounding may differ from eager ops, so then moshi's own rope is called.
- Ring: each layer scatters its own k/v into its own ring with the leader's index tensor, and sets its own
  `end_offset` (and `state.offset`) to the leader's new value: the same integers moshi's `torch.where` gives.
- Mask: the leader's boolean mask, on the same slots (`RingAttention.frames`, as `_Truncated` cuts them).

Graph safety: nothing is keyed by a host counter. The leader recomputes the shared tensors on every call and
stores them as Python attributes of the shared holder; under a CUDA graph, the capture records the leader's kernels
writing them and the followers reading them, so every replay recomputes them before use. The holder and the
shadows are callables, which the graph-safety snapshot does not walk (as for `_Truncated`).
"""

from __future__ import annotations

import math
from typing import Any

import moshi
import moshi.modules.rope as moshi_rope
import moshi.utils.compile as moshi_compile
import torch
from einops import rearrange
from moshi.modules.transformer import StreamingMultiheadAttention, apply_weights_per_step, expand_repeated_kv
from torch.nn import functional as F

from .shadows import InstanceShadows

__all__ = ["ENABLED", "SharedStep"]

# Off switch (tests compare the streams with and without sharing; nothing else turns it off).
ENABLED = True
MOSHI_VERSION = "0.2.13"  # the moshi whose StreamingMultiheadAttention.forward `_SharedForward` reproduces


class SharedStep:
    """Installs `_SharedForward` on the attentions of a `RingAttention` (same instances), when they can share.

    Sharing needs every layer to agree on what is shared: ring capacity, context, RoPE settings, heads and head dim.
    Otherwise (or with fewer than two layers, or `ENABLED` False) nothing is installed and moshi's forward runs.
    """

    def __init__(self, attention: Any) -> None:
        self.attention = attention  # ring_attention.RingAttention: its modules and its current `frames`
        self._shadows = InstanceShadows("forward")
        # The tensors the leader built during the current step (Python attributes, rebound by every leader call).
        self.indexes: torch.Tensor | None = None  # [B, H, T, D] scatter index of this step's keys
        self.index_copy: torch.Tensor | None = None  # [T] index of `index_copy_` (respect_exec_mask False)
        self.end_offset: torch.Tensor | None = None  # every ring's end_offset after the step
        self.offset: torch.Tensor | None = None  # every attention's state.offset after the step
        self.rot: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE cos, sin [B, 1, T, D // 2]
        self.positions: torch.Tensor | None = None  # [B, frames] slot positions
        self.attn_bias: torch.Tensor | None = None  # [B, 1, T, frames] the mask
        self.key: tuple[Any, ...] | None = None  # (B, T, frames) the leader built them for: a host-side check
        # Followers that have not yet read this step's tensors (host-side, refilled by the leader every step): a
        # follower not in it ran before the leader and would reuse the previous step's tensors (same shapes).
        self.waiting: set[int] = set()

    def shareable(self) -> bool:
        modules = self.attention.modules
        # `_SharedForward` is moshi 0.2.13's forward, copied: another moshi release runs its own forward unchanged.
        if not ENABLED or len(modules) < 2 or moshi.__version__ != MOSHI_VERSION:
            return False
        signature = {_signature(m) for m in modules}
        return len(signature) == 1

    def install(self) -> None:
        if self._shadows:
            raise RuntimeError("SharedStep is already installed")
        if not self.shareable():
            return
        self._shadows.install({module: _SharedForward(self, module, index=i)
                               for i, module in enumerate(self.attention.modules)})

    def uninstall(self) -> None:
        self._shadows.restore()
        self.indexes = self.index_copy = self.end_offset = self.offset = None
        self.rot = self.positions = self.attn_bias = self.key = None
        self.waiting = set()

    def __enter__(self) -> SharedStep:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def _signature(m: StreamingMultiheadAttention) -> tuple[Any, ...]:
    cache = m._streaming_state.kv_cache
    rope = (m.rope.max_period, m.rope.interleave) if m.rope is not None else None
    return (cache.capacity, cache.respect_exec_mask, tuple(cache.cache.shape), cache.cache.dtype, m.context, rope,
            m.num_heads, m.kv_repeat, m.embed_dim)


def _rope_eager() -> bool:
    """Whether moshi's `apply_rope` runs eagerly now: `torch_compile_lazy` returned it unwrapped (NO_TORCH_COMPILE
    set when moshi was imported), or its wrapper falls back to it (`no_compile()`, as `runtime.inference_mode` on
    CPU)."""
    return not hasattr(moshi_rope.apply_rope, "__wrapped__") or moshi_compile._compile_disabled


class _SharedForward:
    """`StreamingMultiheadAttention.forward` (moshi 0.2.13) for a causal self-attention over its own ring in
    streaming mode, with the step's shared tensors built by the leader. A callable object, not a closure, so the
    graph-safety snapshot skips it."""

    def __init__(self, shared: SharedStep, module: StreamingMultiheadAttention, index: int) -> None:
        self.shared, self.module, self.index, self.leader = shared, module, index, index == 0

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        m, sh = self.module, self.shared
        state = m._streaming_state
        B, T = query.shape[:2]
        offset = state.offset
        offset_cpu = state.offset_cpu

        projected = apply_weights_per_step(m.in_projs, m.weights_per_step_schedule, query, offset_cpu)
        if m.kv_repeat == 1:
            qkv = rearrange(projected, "b t (p h d) -> p b h t d", p=3, h=m.num_heads)
            q, k, v = qkv
        else:
            q = rearrange(projected[:, :, :m.embed_dim], "b t (h d) -> b h t d", h=m.num_heads)
            k, v = rearrange(projected[:, :, m.embed_dim:], "b t (p kh d) -> p b kh t d", p=2,
                             kh=m.num_heads // m.kv_repeat)
        frames = sh.attention.frames
        cache = state.kv_cache
        if frames is not None and frames >= cache.capacity:
            frames = None  # as `_Truncated`: the whole ring
        if self.leader:
            self._build(q, k, offset, state.exec_mask, T, frames)
            sh.waiting = set(range(1, len(sh.attention.modules)))
        elif self.index not in sh.waiting or sh.key != (B, T, frames):
            raise RuntimeError(f"shared_step: temporal attention layer {self.index} ran before its leader (layer 0) "
                               "in this step: it would reuse the previous step's RoPE angles, ring indices and mask")
        else:
            sh.waiting.discard(self.index)
        if m.rope:
            if sh.rot is not None:
                q, k = _rotate(q, k, *sh.rot, m.rope.interleave)
            else:
                q, k = m.rope(q, k, offset, time_before_heads=False)

        # RingKVCache.complete, with the leader's indices; this layer's own ring and end_offset.
        if cache.respect_exec_mask:
            cache.cache[0].scatter_(2, sh.indexes, k)
            cache.cache[1].scatter_(2, sh.indexes, v)
        else:
            cache.cache[0].index_copy_(2, sh.index_copy, k)
            cache.cache[1].index_copy_(2, sh.index_copy, v)
        keys, values = cache.cache[0], cache.cache[1]
        if not self.leader:
            cache.end_offset.copy_(sh.end_offset)
        if frames is not None:  # `_Truncated`: the first `frames` slots (views)
            keys, values = keys[:, :, :frames], values[:, :, :frames]
        if m.kv_repeat > 1:
            keys = expand_repeated_kv(keys, m.kv_repeat)
            values = expand_repeated_kv(values, m.kv_repeat)

        x = F.scaled_dot_product_attention(q, keys, values, sh.attn_bias, dropout_p=0.0)
        x = rearrange(x, "b h t d -> b t (h d)")
        x = apply_weights_per_step(m.out_projs, m.weights_per_step_schedule, x, offset_cpu)

        if self.leader:
            state.offset[:] = sh.offset
        else:
            state.offset.copy_(sh.offset)
        state.offset_cpu += T
        return x

    def _build(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, exec_mask: torch.Tensor, T: int,
               frames: int | None) -> None:
        """The leader's share of the step, formulas of moshi's `apply_rope`, `RingKVCache.complete` and forward."""
        m, sh = self.module, self.shared
        cache = m._streaming_state.kv_cache
        B, H, _, D = k.shape
        # RoPE angles (apply_rope, time_before_heads=False).
        if m.rope and _rope_eager():
            Dq = q.shape[-1]
            ds = torch.arange(Dq // 2, device=q.device, dtype=torch.float32)
            freqs = torch.exp(ds * (-math.log(m.rope.max_period) * 2 / Dq))
            ts = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32)
            ts = ts.view(B, 1, -1, 1)
            angles = freqs * ts
            sh.rot = (torch.cos(angles), torch.sin(angles))
        else:
            sh.rot = None
        # Ring write indices and slot positions (RingKVCache.complete).
        end_offset = cache.end_offset
        indexes = torch.arange(T, device=end_offset.device, dtype=end_offset.dtype)
        indexes = indexes + end_offset.view(-1, 1)
        indexes = indexes % cache.capacity
        if cache.respect_exec_mask:
            sh.indexes = indexes.view(B, 1, T, 1).expand(-1, H, T, D)
            sh.index_copy = None
        else:
            sh.indexes, sh.index_copy = None, indexes[0]
        slots = torch.arange(cache.capacity, device=end_offset.device, dtype=torch.long)
        last_offset = end_offset.view(-1, 1) + T - 1
        end_index = last_offset % cache.capacity
        delta = slots - end_index
        positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - cache.capacity)
        if cache.respect_exec_mask:
            end_offset[:] = torch.where(exec_mask, end_offset + T, end_offset)
        else:
            end_offset.add_(T)
        sh.end_offset = end_offset  # the leader's ring, already advanced: followers copy it before theirs is read
        invalid = slots >= end_offset.view(-1, 1)
        positions = torch.where(invalid, torch.full_like(positions, -1), positions)
        if frames is not None:
            positions = positions[:, :frames]
        sh.positions = positions
        # The mask (StreamingMultiheadAttention.forward, causal).
        pos_k = positions[:, None]
        pos_q = offset.view(-1, 1, 1) + torch.arange(T, device=q.device, dtype=torch.long).view(-1, 1)
        delta = pos_q - pos_k
        attn_bias = (pos_k >= 0) & (delta >= 0)
        if m.context is not None:
            attn_bias = attn_bias & (delta < m.context)
        sh.attn_bias = attn_bias[:, None]
        # Every attention's offset after the step (read by followers after the leader's own update is issued:
        # a separate tensor, so the leader's in-place write below does not change it).
        sh.offset = torch.where(exec_mask, offset + T, offset)
        sh.key = (B, T, frames)


def _rotate(q: torch.Tensor, k: torch.Tensor, rotr: torch.Tensor, roti: torch.Tensor,
            interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope's rotation with precomputed cos/sin: the same expressions, element for element."""
    D = q.shape[-1]
    if interleave:
        q = q.view(*q.shape[:-1], D // 2, 2)
        k = k.view(*k.shape[:-1], D // 2, 2)
        qr, qi = q[..., 0].float(), q[..., 1].float()
        kr, ki = k[..., 0].float(), k[..., 1].float()
    else:
        qr, qi = q[..., : D // 2].float(), q[..., D // 2:].float()
        kr, ki = k[..., : D // 2].float(), k[..., D // 2:].float()
    qor = qr * rotr - qi * roti
    qoi = qr * roti + qi * rotr
    kor = kr * rotr - ki * roti
    koi = kr * roti + ki * rotr
    dtype = q.dtype
    if interleave:
        qo = torch.stack([qor.to(dtype), qoi.to(dtype)], dim=-1).view(*q.shape[:-2], D)
        ko = torch.stack([kor.to(dtype), koi.to(dtype)], dim=-1).view(*k.shape[:-2], D)
    else:
        qo = torch.cat([qor.to(dtype), qoi.to(dtype)], dim=-1)
        ko = torch.cat([kor.to(dtype), koi.to(dtype)], dim=-1)
    return qo, ko
