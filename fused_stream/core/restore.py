"""The model handed back exactly as it came: host copies of what an evaluation may change, put back bit for bit.

A training loop calls the evaluation every N steps and goes on training the same model. A foreign layer
(`patches.foreign`: a TTT layer, an adapter) may write its trainable weights while streaming, keep inputs in plain
tensor attributes, or reset a trained weight to a pretrained one in its `reset_streaming`. `ModelRestorer` copies
every parameter, buffer and plain tensor attribute of the foreign layers to host memory when it is made, and
`restore()` puts them back: the same `Parameter` and buffer objects (an optimizer's references stay valid) with
their bytes as they were, plain tensor attributes as they were (an attribute added meanwhile is removed).

moshi's own modules write no weight while streaming, so they get no copy: their tensors' version counters (every
in-place write bumps one) are read instead, and `check_untouched()` names any that moved, which would mean this
assumption broke (a moshi release that writes a weight in place) rather than hand back a changed model silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..patches.foreign import foreign_modules, foreign_tensors

__all__ = ["ModelChangedError", "ModelRestorer"]

_ABSENT = object()


class ModelChangedError(RuntimeError):
    """A tensor of one of moshi's modules was written during an evaluation, so the model is not handed back as it
    came (a bug or a moshi change: not the user's input). Deliberately not a `FusedStreamError`: the command line
    reports it as an internal error, with its traceback and the versions, for a bug report."""


@dataclass
class _Saved:
    module: nn.Module
    kind: str  # "parameter", "buffer" or "attribute"
    name: str
    tensor: torch.Tensor | None  # the object the module held (restored by identity)
    host: torch.Tensor | None  # a host copy of its bytes


class ModelRestorer:
    """Host copies of a model's foreign state and the version counters of moshi's tensors, taken at construction."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[_Saved] = []
        # Each foreign module's plain attributes as they were (references): a tensor attribute set meanwhile is put
        # back to what was there (None, say) or removed.
        self.attributes: list[tuple[nn.Module, dict[str, Any]]]
        for _, module, kind, name in foreign_tensors(model):
            tensor = _get(module, kind, name)
            self.saved.append(_Saved(module, kind, name, tensor, _host_copy(tensor)))
        self.attributes = [(module, dict(vars(module))) for _, module in foreign_modules(model)]
        foreign = {id(s.tensor) for s in self.saved if s.tensor is not None}
        self.versions = [(name, t, t._version) for name, t in _named_tensors(model) if id(t) not in foreign]

    @property
    def host_bytes(self) -> int:
        return sum(s.host.numel() * s.host.element_size() for s in self.saved if s.host is not None)

    def restore(self) -> None:
        """Put every saved tensor back: same objects, same bytes; plain tensor attributes added since are removed."""
        with torch.no_grad():
            for s in self.saved:
                if s.kind == "parameter":
                    s.module._parameters[s.name] = s.tensor
                elif s.kind == "buffer":
                    s.module._buffers[s.name] = s.tensor
                else:
                    object.__setattr__(s.module, s.name, s.tensor)
                if s.tensor is not None and s.host is not None:
                    _copy_back(s.tensor, s.host)
        for module, before in self.attributes:
            for name, value in list(vars(module).items()):
                if not isinstance(value, torch.Tensor) or before.get(name, _ABSENT) is value:
                    continue
                if name in before:
                    object.__setattr__(module, name, before[name])
                else:
                    delattr(module, name)

    def check_untouched(self) -> None:
        """Raise `ModelChangedError` if a moshi tensor was written in place since the copies were taken."""
        moved = [name for name, tensor, version in self.versions if tensor._version != version]
        if moved:
            raise ModelChangedError(
                f"the evaluation wrote {len(moved)} tensor(s) of moshi's modules in place ({', '.join(moved[:5])}); "
                "these are not copied (moshi writes no weight while streaming), so the model cannot be handed back "
                "as it came. Please report this with your moshi version.")


def _get(module: nn.Module, kind: str, name: str) -> Any:
    if kind == "parameter":
        return module._parameters.get(name)
    if kind == "buffer":
        return module._buffers.get(name)
    return vars(module).get(name)


def _host_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.is_meta:
        return None
    return tensor.detach().to("cpu", copy=True)


def _copy_back(tensor: torch.Tensor, host: torch.Tensor) -> None:
    """The saved bytes into `tensor`; a tensor resized meanwhile (`.data = ...`) gets its old shape back first."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if data.shape != host.shape or data.dtype != host.dtype:
        tensor.data = host.to(device=data.device)
        return
    data.copy_(host)


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(name, p) for name, p in model.named_parameters(remove_duplicate=True)]
    out += [(name, b) for name, b in model.named_buffers(remove_duplicate=True)]
    return out
