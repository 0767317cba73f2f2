"""Layers this package does not know: which they are, how often they update, and whether chunks stream them exactly.

A moshi `LMModel` is moshi's modules plus torch's stock layers inside them. Fine-tuning code adds its own: TTT layers,
adapters, wrappers. moshi's modules keep every state between steps in their streaming state and never write their
weights while streaming; nothing can be assumed of the others. So a module is *foreign* unless its class is one of
moshi's own language-model classes (`MOSHI_CLASSES`, by qualified name: a fork that adds a TTT layer inside the
`moshi` package itself still gets it counted as foreign), torch's, or one of this package's modules that declares
how it streams; a torch layer (an `nn.Linear`) belongs to the nearest module above it that is not torch's — a
foreign layer's `nn.Linear` is foreign.

What follows from it:
- `foreign_tensors(model)`: every parameter, buffer and tensor attribute a foreign module holds: what an evaluation
  may change, so what `core.restore` copies and puts back;
- `update_period(module)`: the frames between the state updates of a layer that says so (`update_period`,
  `mini_batch_size`, `mini_batch`, `chunk_size`, `ttt_chunk_size`, the first that is a positive int): the
  verification prefix must reach past it, or a layer that goes wrong only after its first update passes;
- `chunk_exact(module)`: whether streaming C frames per step computes what C steps of one frame do. moshi's modules
  do (with the enlarged ring, `engine.stream`); a foreign layer does only when it says so with a class attribute
  `chunk_exact = True` (this package's TTT layer does). Chunk mode refuses the others (`chunk_refusal`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ForeignLayer", "chunk_refusal", "foreign_layers", "foreign_modules", "foreign_tensors", "update_period"]

# moshi's classes that make up an LMModel (moshi 0.2.13): they keep their step-to-step state in moshi's streaming
# state and write no weight while streaming (`tests/core/test_restore.py` checks the second on a whole model).
MOSHI_CLASSES = frozenset({
    "moshi.models.lm.LMModel", "moshi.models.lm_utils.ScaledEmbedding", "moshi.modules.gating.ActivationGating",
    "moshi.modules.lora.LoRALinear", "moshi.modules.rope.RotaryEmbedding", "moshi.modules.streaming.StreamingContainer",
    "moshi.modules.streaming.StreamingModule", "moshi.modules.transformer.LayerNormF32",
    "moshi.modules.transformer.LayerScale", "moshi.modules.transformer.ProjectedTransformer",
    "moshi.modules.transformer.RMSNorm", "moshi.modules.transformer.StreamingMultiheadAttention",
    "moshi.modules.transformer.StreamingTransformer", "moshi.modules.transformer.StreamingTransformerLayer",
    "moshi.utils.quantize.QLinear",
})

# Attributes read, in this order, as the frames between a layer's state updates.
PERIOD_ATTRIBUTES = ("update_period", "mini_batch_size", "mini_batch", "chunk_size", "ttt_chunk_size")


@dataclass
class ForeignLayer:
    name: str  # its name in model.named_modules() ("" for the model itself)
    module: nn.Module
    period: int | None  # frames between its state updates, when it says so
    chunk_exact: bool  # it declares that C frames per step equal C steps of one
    ours: bool = False  # this package's own layer (tested to stream like its forward)


def _origin(module: nn.Module) -> str:
    """"moshi", "torch", "known" (a module of this package that declares `chunk_exact`) or "foreign"."""
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in MOSHI_CLASSES:
        return "moshi"
    package = cls.__module__.split(".")[0]
    if package == "torch":
        return package
    if package == "fused_stream" and hasattr(type(module), "chunk_exact"):
        return "known"
    return "foreign"


def _owners(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, origin) for every module, a torch layer taking the origin of the module above it."""
    origins: dict[str, str] = {}
    for name, module in model.named_modules():
        origin = _origin(module)
        if origin == "torch":
            parent = name.rpartition(".")[0] if name else None
            origin = origins.get(parent, "moshi") if parent is not None else "moshi"
        origins[name] = origin
        yield name, module, origin


def _has_state(module: nn.Module) -> bool:
    """Parameters or buffers of its own, or tensors kept in plain attributes (state outside any streaming state)."""
    return (any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
            or any(isinstance(value, torch.Tensor) for value in vars(module).values()))


def _within(name: str, ancestor: str) -> bool:
    """Whether module `name` lies strictly inside module `ancestor` ("" is the model itself)."""
    return name != ancestor and (ancestor == "" or name.startswith(f"{ancestor}."))


def update_period(module: nn.Module) -> int | None:
    """The frames between the state updates of `module`, when one of `PERIOD_ATTRIBUTES` says so."""
    for attribute in PERIOD_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def foreign_layers(model: nn.Module) -> list[ForeignLayer]:
    """The layers of `model` that hold state and are not moshi's (see the module docstring), outermost first; a
    layer inside another foreign layer is reported through its outermost foreign ancestor only. A foreign wrapper
    whose only state is in moshi modules inside it streams like them and is not reported."""
    owners = list(_owners(model))
    found: list[ForeignLayer] = []
    for name, module, origin in owners:
        if origin == "moshi" or any(_within(name, layer.name) for layer in found):
            continue  # moshi's, or inside a layer already reported: its state is that layer's
        if origin == "known":
            period = next((p for m in module.modules() if (p := update_period(m)) is not None), None)
            found.append(ForeignLayer(name, module, period, chunk_exact=True, ours=True))
            continue
        inside = [m for n, m, o in owners if o != "moshi" and (n == name or _within(n, name))]
        if not any(_has_state(m) for m in inside):
            continue  # a stateless wrapper streams like what it wraps
        found.append(ForeignLayer(name, module, update_period(module),
                                  chunk_exact=getattr(type(module), "chunk_exact", False) is True))
    return found


def foreign_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that is not moshi's (torch layers inside foreign ones included)."""
    return [(name, module) for name, module, origin in _owners(model) if origin != "moshi"]


def foreign_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(module name, module, kind, attribute) of every tensor a foreign module holds: kind "parameter", "buffer" or
    "attribute" (a tensor in a plain attribute). This package's own layers are included: an evaluation restores
    them too."""
    out = []
    for name, module in foreign_modules(model):
        for key, value in module._parameters.items():
            if value is not None:
                out.append((name, module, "parameter", key))
        for key, value in module._buffers.items():
            if value is not None:
                out.append((name, module, "buffer", key))
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                out.append((name, module, "attribute", key))
    return out


def chunk_refusal(model: nn.Module) -> str | None:
    """Why chunk mode (C > 1) would not be exact for `model`, naming the layers; None when every layer is known to
    stream chunks exactly."""
    unknown = [layer for layer in foreign_layers(model) if not layer.chunk_exact]
    if not unknown:
        return None
    names = ", ".join(f"{layer.name or '<model>'} ({type(layer.module).__name__})" for layer in unknown[:4])
    more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
    return (f"layers not known to stream chunks exactly: {names}{more}; a layer whose state updates every N frames "
            "may compute something else when C frames arrive at once. chunk_size=1 (frame mode) is exact for any "
            "layer; a layer that is chunk-exact can say so with a class attribute `chunk_exact = True`")
