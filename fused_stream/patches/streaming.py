"""moshi's streaming state, read and resized: the one place that knows where moshi keeps it.

moshi keeps each streaming module's state in its private `_streaming_state` (for attentions a ring KV cache with
write offsets), allocates it in `streaming(B)` and frees it on leaving. The engine needs to find the rings, enlarge
them for exact chunks, count their bytes, predict them before allocating (the preflight), and tell whether a model
is streaming; everything here reads moshi 0.2.13's layout, and nothing else in the package touches it.
"""

from __future__ import annotations

from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention, StreamingTransformer

__all__ = ["enlarge_rings", "enlarge_rings_in", "held_state_bytes", "is_streaming", "predicted_state_bytes",
           "ring_caches", "stop_streaming"]


def ring_caches(model: LMModel) -> list[RingKVCache]:
    """The ring KV caches of the temporal transformer's attention layers (inside streaming())."""
    caches = []
    for module in model.transformer.modules():
        state = getattr(module, "_streaming_state", None)
        if isinstance(module, StreamingMultiheadAttention) and state is not None and state.kv_cache is not None:
            caches.append(state.kv_cache)
    return caches


def enlarge_rings(model: LMModel, context_extra: int) -> None:
    """Give every temporal-transformer ring KV cache `context + context_extra` slots (call inside streaming()).

    Why: moshi sizes the ring to `context`. A chunk writes its C keys before its C queries attend, so the ring
    then holds only the last `context` positions, ending at the chunk's last frame; the chunk's first query
    needs keys reaching back `context - 1` frames before *its own* position, C - 1 of which were just
    overwritten. With `context + C - 1` slots every needed key is still there; the attention mask
    (delta < context) still limits each query to exactly `context` keys, so results equal frame mode.
    """
    enlarge_rings_in(model.transformer, context_extra)


def enlarge_rings_in(transformer: torch.nn.Module | None, context_extra: int) -> None:
    """`enlarge_rings` for the attentions of any streaming transformer (Mimi's encoder's too; None: nothing)."""
    for module in (transformer.modules() if transformer is not None else ()):
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        state = module._streaming_state
        if state is None or state.kv_cache is None or module.context is None:
            continue
        old = state.kv_cache
        _, batch, heads, _, dim_per_head = old.cache.shape
        respect_exec_mask, device, dtype = old.respect_exec_mask, old.cache.device, old.cache.dtype
        # Drop every reference to the old ring before allocating the larger one: for Moshi 7B at B = 32 the
        # two would coexist for 1.5 GB per layer otherwise.
        state.kv_cache = old = None
        state.kv_cache = RingKVCache(
            batch, heads, dim_per_head, module.context + context_extra,
            respect_exec_mask=respect_exec_mask, device=device, dtype=dtype,
        )


def held_state_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the tensors of every streaming state of `model` (KV caches, offsets, masks)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for module in model.modules():
        visit(getattr(module, "_streaming_state", None))
    return total


def _streaming_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `model.streaming(B)` gives a state, found the way moshi does: every StreamingModule below the
    root except the subtrees of detached ones (the depformer runs non-streaming and holds no state)."""
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module, root: bool) -> None:
        if isinstance(module, StreamingModule):
            if module._streaming_detached and not root:
                return
            found.append(module)
        for child in module.children():
            visit(child, False)

    visit(model, True)
    return found


def predicted_state_bytes(model: LMModel, B: int, C: int, dtype: torch.dtype | None) -> tuple[int, int, int]:
    """(bytes of every streaming state, largest ring capacity, heads of that attention), mirroring moshi 0.2.13's
    `_init_streaming_state` methods plus the driver's `enlarge_rings`."""
    total, capacity, heads = 0, 1, 1
    for module in _streaming_modules(model):
        total += B  # State.exec_mask [B] bool, in every state
        if isinstance(module, StreamingTransformer):
            total += 8 * B  # offsets [B] int64
        if not isinstance(module, StreamingMultiheadAttention):
            continue  # other states (layers, containers) hold only exec_mask
        total += 8 * B  # offset [B] int64
        if module.cross_attention:
            continue
        cap = module.context if module.context is not None else module.weights_per_step
        if not cap:
            raise ValueError("an attention has no context (context=None): streaming needs a finite one")
        if module.context is not None and C > 1:
            cap += C - 1  # enlarge_rings: exact chunk mode needs context + C - 1 slots
        kv_heads, dim_per_head = module.num_heads // module.kv_repeat, module.embed_dim // module.num_heads
        weight = getattr(module.in_projs[0], "weight", None)
        cache_dtype = dtype or (weight.dtype if weight is not None and weight.is_floating_point() else torch.float16)
        itemsize = torch.empty((), dtype=cache_dtype, device="meta").element_size()
        total += 2 * B * kv_heads * cap * dim_per_head * itemsize  # cache [2, B, H, cap, D]
        total += 8 * (B if not module.weights_per_step else 1)  # end_offset, per sequence if respecting exec_mask
        if cap > capacity:
            capacity, heads = cap, module.num_heads
    return total, capacity, heads


def is_streaming(model: torch.nn.Module) -> bool:
    """Whether any streaming module of `model` holds a streaming state."""
    return any(isinstance(m, StreamingModule) and m._streaming_state is not None for m in model.modules())


def stop_streaming(model: torch.nn.Module) -> None:
    """Leave streaming mode if anything left `model` in it (an exception between open and close)."""
    if is_streaming(model) and isinstance(model, StreamingModule):
        model._stop_streaming()
