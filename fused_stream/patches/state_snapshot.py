"""What moves in a model between two streaming steps: snapshots of every module's state, compared leaf by leaf.

A snapshot records, for every module, its attributes, parameters, buffers and `_streaming_state` (recursing into
state objects such as moshi's `RingKVCache`, and one level into containers): a tensor by address and shape, a
Python value by value. `compare` lists what moved as (module, attribute, kind, old, new); `Finding` is one such
move with the reason it is harmless for a CUDA graph replay, when it is (`harmless_reason`: the few moshi
attributes known to move harmlessly). `graphsafe` runs steps and reports; the rehearsed graphs check every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformerLayer

KINDS = ("python_value", "rebound_tensor", "shape_change")
MAX_DEPTH = 4  # nesting of state objects followed (moshi: state -> RingKVCache -> tensors is depth 2)
STATE = "_streaming_state"


@dataclass
class Finding:
    module: str  # as in model.named_modules(); "" is the model itself
    attribute: str  # dotted path from the module, e.g. "_streaming_state.offset_cpu", "buffer", "fast"
    kind: str  # "python_value" | "rebound_tensor" | "shape_change"
    detail: str
    harmless: str | None = None  # why a graph replay does not care, for known moshi cases

    def __str__(self) -> str:
        where = f"{self.module or '<model>'}.{self.attribute}"
        note = f" (harmless: {self.harmless})" if self.harmless else ""
        return f"{where}: {self.kind}: {self.detail}{note}"


def unsafe(findings: Iterable[Finding]) -> list[Finding]:
    """The findings without a harmless reason: what makes a captured step wrong."""
    return [finding for finding in findings if finding.harmless is None]


# ------------------------------------------------------------------------------------------------ harmless cases


@dataclass(frozen=True)
class _Rule:
    module_type: type
    attribute: str
    kind: str
    applies: Callable[[torch.nn.Module], bool]
    reason: str


_HARMLESS = (
    # moshi/modules/transformer.py, StreamingMultiheadAttention.forward: `state.offset_cpu` is read only as the
    # `offset` argument of `apply_weights_per_step(self.in_projs | self.out_projs, ...)`, which returns
    # `modules[0](x)` without looking at it when the ModuleList has one entry (weights_per_step == 0, the temporal
    # transformer). The depformer has several, but runs non-streaming here (forward_depformer_training).
    _Rule(
        StreamingMultiheadAttention, f"{STATE}.offset_cpu", "python_value",
        lambda m: len(m.in_projs) == 1 and len(m.out_projs) == 1,
        "moshi reads _MHAState.offset_cpu only in apply_weights_per_step, which ignores it with a single "
        "in/out projection (no weights_per_step); device positions come from the `offset` tensor",
    ),
    # moshi/modules/transformer.py, StreamingTransformerLayer._ff_block: `state.offset_cpu` reaches
    # `apply_weights_per_step(self.gating, ...)` only under `if self.weights_per_step`; forward() only bumps it.
    _Rule(
        StreamingTransformerLayer, f"{STATE}.offset_cpu", "python_value",
        lambda m: not m.weights_per_step,
        "moshi reads _LayerState.offset_cpu only in _ff_block under `if self.weights_per_step` (the depformer's "
        "per-codebook weights); this layer has none",
    ),
    # moshi/modules/streaming.py, StreamingModule._apply_named_streaming: the only reader of `_cached_children`,
    # called by streaming()/reset_streaming()/get/set_streaming_state, all outside the captured step.
    _Rule(
        StreamingModule, "_cached_children", "python_value",
        lambda m: True,
        "moshi's list of streaming submodules, read only by _apply_named_streaming (start/stop/reset of streaming), "
        "never inside a step",
    ),
)


def harmless_reason(module: torch.nn.Module, attribute: str, kind: str) -> str | None:
    """Why `attribute` of `module` may move without breaking a graph replay, or None when it may not."""
    for rule in _HARMLESS:
        if isinstance(module, rule.module_type) and attribute == rule.attribute and kind == rule.kind:
            if rule.applies(module):
                return rule.reason
    return None


# ------------------------------------------------------------------------------------------------------ snapshot

# A snapshot maps (module name, attribute path) to a leaf: ("value", v) for int/float/bool/None, ("len", n) for a
# container, ("object", type name) for a state object recursed into, ("tensor", t, data_ptr, storage_ptr, shape).
# Tensor leaves hold the tensor itself: while the previous snapshot keeps it alive, a rebound attribute cannot land
# on the same address again (the CPU allocator would happily reuse a freed block and hide the rebinding).
Leaf = tuple
Snapshot = dict[tuple[str, str], Leaf]

_SKIP_MODULE_KEYS = {"_modules", "_parameters", "_buffers", STATE}


def leaf_of(value: Any) -> Leaf | None:
    if value is None or isinstance(value, (bool, int, float)):
        return ("value", value)
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage().data_ptr() if value.device.type != "meta" else 0
        return ("tensor", value, value.data_ptr(), storage, tuple(value.shape))
    return None


def _is_state_object(value: Any) -> bool:
    """Objects worth recursing into: plain data holders (dataclasses, RingKVCache), not modules or callables."""
    if isinstance(value, (torch.nn.Module, type, torch.device, torch.dtype, str, bytes)) or callable(value):
        return False
    return dataclasses.is_dataclass(value) or hasattr(value, "__dict__")


def _visit(out: Snapshot, module: str, path: str, value: Any, depth: int, seen: set[int]) -> None:
    leaf = leaf_of(value)
    if leaf is not None:
        out[(module, path)] = leaf
        return
    if isinstance(value, (list, tuple, dict)):
        out[(module, path)] = ("len", len(value))
        # One level in: the elements' own values and tensors, not their insides (keeps the walk small).
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            item_leaf = leaf_of(item)
            if item_leaf is not None:
                out[(module, f"{path}[{key!r}]")] = item_leaf
        return
    if depth < MAX_DEPTH and _is_state_object(value) and id(value) not in seen:
        seen.add(id(value))
        out[(module, path)] = ("object", type(value).__name__)
        for name, item in vars(value).items():
            _visit(out, module, f"{path}.{name}", item, depth + 1, seen)


def snapshot(model: torch.nn.Module) -> Snapshot:
    """Every module's Python values, container sizes, tensors (parameters and buffers by name), streaming state."""
    out: Snapshot = {}
    for name, module in model.named_modules():
        seen: set[int] = set()
        for key, value in vars(module).items():
            if key not in _SKIP_MODULE_KEYS:
                _visit(out, name, key, value, 1, seen)
        # Parameters and buffers under the name the module's code uses (self.fast), so a rebound buffer is named.
        for key, value in list(module._parameters.items()) + list(module._buffers.items()):
            _visit(out, name, key, value, 1, seen)
        state = getattr(module, STATE, None)
        if state is not None:
            _visit(out, name, STATE, state, 0, seen)
    return out


# ------------------------------------------------------------------------------------------------------ compare


def _describe(leaf: Leaf | None) -> str:
    if leaf is None:
        return "absent"
    if leaf[0] == "value":
        return repr(leaf[1])
    if leaf[0] == "len":
        return f"len {leaf[1]}"
    if leaf[0] == "object":
        return f"<{leaf[1]}>"
    return f"tensor{list(leaf[4])}"


def compare(before: Snapshot, after: Snapshot) -> list[tuple[str, str, str, str, str]]:
    """(module, attribute, kind, before, after) for every leaf that moved between two snapshots."""
    moved: list[tuple[str, str, str, str, str]] = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a is not None and b is not None and a[0] == b[0] == "tensor":
            if a[2] != b[2] or a[3] != b[3]:
                moved.append((*key, "rebound_tensor", f"0x{a[2]:x}", f"0x{b[2]:x}"))
            if a[4] != b[4]:
                moved.append((*key, "shape_change", str(list(a[4])), str(list(b[4]))))
        elif a is None or b is None or a[0] != b[0] or a[1:] != b[1:]:
            moved.append((*key, "python_value", _describe(a), _describe(b)))
    # Under a container that grew or an object that appeared, the new elements are the same change: keep the
    # outermost report only.
    reported = {(m, attr) for m, attr, kind, *_ in moved if kind == "python_value"}
    return [entry for entry in moved if not _under_reported(entry[0], entry[1], reported)]


def _under_reported(module: str, attribute: str, reported: set[tuple[str, str]]) -> bool:
    for cut in range(len(attribute)):
        if attribute[cut] in ".[" and (module, attribute[:cut]) in reported:
            return True
    return False


def format_findings(findings: Iterable[Finding]) -> str:
    """One line per finding, unsafe first: for logs and the driver's refusal message."""
    ordered = sorted(findings, key=lambda f: (f.harmless is not None, f.module, f.attribute, f.kind))
    return "\n".join(str(finding) for finding in ordered)


# ------------------------------------------------------------------------------------------------ streaming state

# A slot of the streaming state: (holder, key) — an object and an attribute name, or a list and an index — and the
# value it holds now (a tensor, or a Python int/float/bool/None).
Slot = tuple[Any, Any, Any]


def streaming_state_slots(model: torch.nn.Module) -> dict[str, Slot]:
    """Every tensor and Python number of every module's `_streaming_state`, by "module:path": all that moves between
    two steps of a stream (KV ring caches and their offsets, exec masks, TTT fast weights, moshi's `offset_cpu`).

    The walk is the snapshot's (state objects followed to `MAX_DEPTH`, one level into lists and tuples) restricted to
    the streaming state, so the parameters, buffers and module attributes it does not visit are those a step leaves
    alone (`graphsafe` and the rehearsed graphs check that on every stream).
    """
    slots: dict[str, Slot] = {}

    def visit(holder: Any, key: Any, value: Any, path: str, depth: int, seen: set[int]) -> None:
        if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float)):
            slots[path] = (holder, key, value)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor) or isinstance(item, (bool, int, float)) and isinstance(value, list):
                    slots[f"{path}[{i}]"] = (value, i, item)
        elif depth < MAX_DEPTH and _is_state_object(value) and id(value) not in seen:
            seen.add(id(value))
            for name, item in vars(value).items():
                visit(value, name, item, f"{path}.{name}", depth + 1, seen)

    for name, module in model.named_modules():
        state = getattr(module, STATE, None)
        if state is not None:
            visit(module, STATE, state, f"{name}:{STATE}", 0, set())
    return slots
