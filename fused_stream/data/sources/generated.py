"""Generated codes: `generate` random sequences of `frames` frames in the model's layout, identical on every rank
for one seed (the demo, and tests that need no file)."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import DataError
from ..codes import generate_codes
from . import DataSource, Item, Loader, Request, option_name, register


def open_generated(request: Request) -> tuple[list[Item], Loader]:
    count, frames = request.value, request.options["frames"]
    if frames is None:
        raise DataError(f"{option_name('generate')} needs {option_name('frames')}: the length of each generated "
                        "sequence")
    if count < 1 or frames < 1:
        raise DataError(f"{option_name('generate')} needs >= 1 sequences of >= 1 frames, got {count} x {frames}")
    # All of it, then the first max_files: the same sequences on every rank whatever its share.
    batch = generate_codes(request.model, count, frames, seed=request.options["seed"])[: request.max_files]
    items = [Item(i, f"generated_{i}", [], frames) for i in range(len(batch))]

    def load(item: Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
        return batch[item.index].clone(), []

    return items, load


SOURCE = register(DataSource(name="generate", options=("frames", "seed"), progress="loading codes",
                             open=open_generated, lays_out=False))
