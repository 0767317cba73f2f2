"""Codes files (.pt / .npy / .safetensors, see data/codes.py): one sequence per file, laid out for the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.inputs import layout_codes
from ..codes import codes_file_frames, codes_files, load_codes_file
from ..librilight import relative_name
from . import DataSource, Item, Loader, Request, register


def open_codes(request: Request) -> tuple[list[Item], Loader]:
    root = Path(request.value)
    files = codes_files(root)[: request.max_files]
    items = [Item(i, relative_name(f, root), [f], codes_file_frames(f)) for i, f in enumerate(files)]

    def load(item: Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
        file = item.files[0]
        laid = layout_codes(request.model, load_codes_file(file), source=str(file),
                            invalid_tokens=request.invalid_tokens, **request.fill)
        return laid, [str(file)]

    return items, load


SOURCE = register(DataSource(name="codes", options=(), progress="loading codes", open=open_codes))
