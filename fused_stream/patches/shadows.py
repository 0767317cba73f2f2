"""`InstanceShadows`: how a stream swaps one method of some moshi modules for its own and puts moshi's back."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["InstanceShadows"]

_ABSENT = object()


class InstanceShadows:
    """Per-instance shadows of one attribute of some modules (never the class): installed all or none, and
    restored exactly, a pre-existing instance attribute (another wrapper) included."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._saved: list[tuple[torch.nn.Module, Any]] = []

    def __bool__(self) -> bool:
        return bool(self._saved)

    def install(self, values: dict[torch.nn.Module, Any]) -> None:
        try:
            for module, value in values.items():
                self._saved.append((module, module.__dict__.get(self.name, _ABSENT)))
                setattr(module, self.name, value)
        except BaseException:  # e.g. Ctrl-C half way: leave the modules exactly as they were
            self.restore()
            raise

    def restore(self) -> None:
        while self._saved:
            module, previous = self._saved.pop()
            if previous is _ABSENT:
                del module.__dict__[self.name]
            else:
                module.__dict__[self.name] = previous
