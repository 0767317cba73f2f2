"""A CPU-capable check that a model's streaming step can be captured in a CUDA graph and replayed.

A CUDA graph replays the device work of the captured step on the captured addresses, and nothing else. So three
things a module may do per step are silently lost on replay:

- change a Python value (an int counter, a float, a bool, the length of a list or dict it appends to): the change
  happens once, at capture, and never again;
- rebind a tensor attribute to a new tensor (`self.w = self.w + dw`) instead of updating it in place
  (`self.w.add_(dw)`): the replay keeps reading and writing the tensor that existed at capture;
- change a tensor's shape between steps: a graph has one shape per captured kernel.

`check_stream` runs a few steps of a loaded `Stream` (the unit the driver captures)
and snapshots, between steps, every module's attributes, parameters, buffers and `_streaming_state` (recursing
into state objects such as moshi's `RingKVCache`, and one level into containers). Every attribute that moves is a
`Finding`; the few moshi attributes known to move harmlessly carry the reason, and `unsafe()` keeps the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformerLayer

from .runtime import inference_mode
from .stream import Stream

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


def _leaf(value: Any) -> Leaf | None:
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
    leaf = _leaf(value)
    if leaf is not None:
        out[(module, path)] = leaf
        return
    if isinstance(value, (list, tuple, dict)):
        out[(module, path)] = ("len", len(value))
        # One level in: the elements' own values and tensors, not their insides (keeps the walk small).
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            item_leaf = _leaf(item)
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


# ------------------------------------------------------------------------------------------------------ the check


def check_graph_safety(
    model: LMModel, codes: torch.Tensor, *, chunk_size: int = 1, steps: int = 3, backend: str = "torch"
) -> list[Finding]:
    """Open a Stream of `model` on `codes` [B, K, T] (or [K, T]), run `steps` steps, report what moves.

    The model must not be streaming already; the Stream is closed afterwards. Runs on the model's device (no GPU
    needed). Use `unsafe(findings)` for what would break a captured graph.
    """
    if steps < 1 or chunk_size < 1:
        raise ValueError(f"steps and chunk_size must be >= 1, got steps={steps}, chunk_size={chunk_size}")
    device = next(model.parameters()).device
    codes = (codes[None] if codes.dim() == 2 else codes).to(device)
    B, _, T = codes.shape
    lengths = torch.full((B,), T, dtype=torch.long, device=device)
    with inference_mode(model):
        stream = Stream(model, B, chunk_size, T, backend=backend)
        try:
            stream.load(codes, lengths)
            return check_stream(stream, steps)
        finally:
            stream.close()


def check_stream(stream: Stream, steps: int = 3) -> list[Finding]:
    """Run `steps` calls of a loaded `stream` (the unit a graph captures), snapshot the model between them, and
    report every attribute that moves; the stream is reset to the start of its batch afterwards.

    The driver runs this on its run's first stream before capturing it: the real batch, shape and backend, and no
    second copy of the model's streaming state.
    """
    model = stream.model
    modules = dict(model.named_modules())
    changes: dict[tuple[str, str, str], list[tuple[int, str, str]]] = {}
    stream.reset()  # the state a captured graph starts from
    before = snapshot(model)
    for index in range(1, steps + 1):
        stream.step()
        after = snapshot(model)
        for module, attribute, kind, old, new in compare(before, after):
            changes.setdefault((module, attribute, kind), []).append((index, old, new))
        before = after  # keeps the previous step's tensors alive (see Leaf)
    stream.reset()
    findings = []
    for (module, attribute, kind), moves in sorted(changes.items()):
        reason = harmless_reason(modules[module], attribute, kind) if module in modules else None
        findings.append(Finding(module, attribute, kind, _detail(kind, moves, steps), reason))
    return findings


def _detail(kind: str, moves: list[tuple[int, str, str]], steps: int) -> str:
    at = ", ".join(str(index) for index, _, _ in moves)
    chain = " -> ".join([moves[0][1]] + [new for _, _, new in moves])
    if kind == "rebound_tensor":
        return f"rebound to a new tensor at step {at} of {steps} (a replay keeps using the captured one)"
    if kind == "shape_change":
        return f"shape {chain} at step {at} of {steps} (a graph has fixed shapes)"
    return f"{chain} at step {at} of {steps} (a replay does not repeat Python-side changes)"


def format_findings(findings: Iterable[Finding]) -> str:
    """One line per finding, unsafe first: for logs and the driver's refusal message."""
    ordered = sorted(findings, key=lambda f: (f.harmless is not None, f.module, f.attribute, f.kind))
    return "\n".join(str(finding) for finding in ordered)
