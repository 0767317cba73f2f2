"""What TTT layers learned while a run streamed: per-sequence statistics of their fast weights, kept on the device.

The driver knows nothing of TTT: the caller passes `ttt_hooks(model)` (a `TTTTracker` under the key "ttt" when the
model has TTT layers) and the driver calls `begin_batch()` / `end_batch()` around each batch and puts `report()`
in the run's report under that key.

Which layers: ours and any layer with `fast_weight_tensors()`; a streaming module named *ttt*; and every stateful
layer the package does not know (`patches.foreign`), whatever its name: a layer that writes its parameters or buffers
while streaming is reported with how much they changed per batch (one value for the whole batch, repeated per row,
since a parameter has no batch dimension).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..patches.foreign import foreign_layers
from .layer import _TTTState

__all__ = ["TTTTracker", "ttt_hooks", "ttt_modules", "ttt_report"]


def ttt_hooks(model: nn.Module) -> dict[str, TTTTracker]:
    """The driver hooks that report a model's TTT layers: {"ttt": TTTTracker} if it has any, else {}."""
    return {"ttt": TTTTracker(model)} if ttt_modules(model) else {}


def ttt_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """TTT layers: ours, any module with `fast_weight_tensors()`, a streaming module named *ttt*, or a foreign
    stateful layer (`patches.foreign`) of any name."""
    found = []
    for name, module in model.named_modules():
        own = callable(getattr(module, "fast_weight_tensors", None))
        by_name = "ttt" in name.rsplit(".", 1)[-1].lower() and getattr(module, "_streaming_state", None) is not None
        if own or (by_name and not any(name.startswith(f + ".") for f, _ in found)):
            found.append((name, module))
    for layer in foreign_layers(model):
        related = any(_related(layer.name, f) for f, _ in found)
        if not related and not hasattr(type(layer.module), "chunk_exact"):  # this package's layers are found above
            found.append((layer.name, layer.module))
    return found


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _per_row(module: nn.Module) -> bool:
    """Whether its fast weights come one per batch row (ours, a streaming state) or shared (parameters, buffers)."""
    own = callable(getattr(module, "fast_weight_tensors", None))
    return own or bool(_state_tensors(module))


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The floating tensors of its streaming state that hold one entry per batch element."""
    state = getattr(module, "_streaming_state", None)
    if state is None:
        return {}
    return {k: v for k, v in vars(state).items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.dim() > 0 and v.shape[0] == state.batch_size}


def _fast_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    if callable(getattr(module, "fast_weight_tensors", None)):
        return dict(module.fast_weight_tensors())
    per_row = _state_tensors(module)
    if per_row:
        return per_row
    # A foreign layer: its floating parameters and buffers, which it may write while streaming.
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


class TTTTracker:
    """Device-side statistics of every TTT layer per sequence; `report()` makes the one host copy.

    Driver protocol: `begin_batch()` after a batch is loaded (streaming state reset), `end_batch()` after its last
    step and before the next load. Nothing here syncs with the host until `report()`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = ttt_modules(model)
        self._start: dict[str, dict[str, torch.Tensor]] = {}
        self._rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in self.modules}

    def begin_batch(self) -> None:
        self._start = {name: {k: t.detach().clone() for k, t in _fast_weights(m).items()} for name, m in self.modules}

    def end_batch(self) -> None:
        for name, module in self.modules:
            start, now = self._start.get(name, {}), _fast_weights(module)
            if not now or not start:
                continue
            per_row = _per_row(module)
            rows = next(iter(now.values())).shape[0] if per_row else 1
            diff = sum(((now[k].float() - start[k].float()).reshape(rows, -1) ** 2).sum(1) for k in now)
            base = sum((start[k].float().reshape(rows, -1) ** 2).sum(1) for k in now)
            rel = diff.sqrt() / base.sqrt().clamp_min(1e-30)
            B = rows if per_row else _batch_size(self.model)  # shared weights: one value, repeated per row
            rel = rel.expand(B)
            counter = module.updates_applied() if hasattr(module, "updates_applied") else None
            updates = counter.clone() if counter is not None else torch.full((B,), -1, device=rel.device)
            self._rows[name].append((updates.double(), rel.double()))

    def report(self) -> dict:
        """{"layers": {name: {updates_applied, relative_change, weights_changed, ...}}} with one host copy."""
        names = [n for n in self._rows if self._rows[n]]
        if not names:
            return {"layers": {}}
        per_layer = [torch.stack([torch.cat([u for u, _ in self._rows[n]]), torch.cat([r for _, r in self._rows[n]])])
                     for n in names]
        flat = torch.cat(per_layer, dim=1).cpu()  # the one host copy
        layers, col = {}, 0
        for name in names:
            count = sum(u.shape[0] for u, _ in self._rows[name])
            updates, rel = flat[0, col : col + count].tolist(), flat[1, col : col + count].tolist()
            col += count
            layers[name] = {
                "updates_applied": [int(u) if u >= 0 else None for u in updates],  # per batch row, incl. padding
                "relative_change": rel,  # ‖W_end − W_start‖_F / ‖W_start‖_F per sequence
                "weights_changed": all(r > 0 and math.isfinite(r) for r in rel),
            }
        return {"layers": layers}


def _batch_size(model: nn.Module) -> int:
    """The batch the model streams (1 outside streaming)."""
    state = getattr(model, "_streaming_state", None)
    return int(getattr(state, "batch_size", 1) or 1)


def ttt_report(model: nn.Module) -> dict:
    """The current streaming state of every TTT layer vs its reset value, one host copy (for our layers exactly;
    third-party layers report their counter only, as their start value is unknown without a TTTTracker)."""
    tracker = TTTTracker(model)
    for name, module in tracker.modules:
        state = module._streaming_state
        if isinstance(state, _TTTState):
            B = state.batch_size
            tracker._start[name] = {"w": state.init_w.expand_as(state.w0), "b": state.init_b.expand(B, -1, -1)}
    tracker.end_batch()
    return tracker.report()
