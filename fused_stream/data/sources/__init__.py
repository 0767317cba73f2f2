"""Data sources: where a run's sequences come from, one registered `DataSource` per kind (codes files, audio
through Mimi, generated codes), each in a module of this folder.

A source lists its items cheaply (names, files, a length estimate from headers: nothing loaded) and returns how to
load one; `data.dataset.load_dataset` does the rest the same way for every source (max_files, duplicates, shards,
min_frames, the crop, errors collected or raised). A new source is one module here that calls `register` (found
and imported below), its test and a README line: its name becomes a keyword of `load_dataset`, and its own
options (`DataSource.options`) reach it in `Request.options`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel


@dataclass
class Item:
    """One sequence to be: a generated tensor, a codes file, an audio file or a book of chapters."""

    index: int
    name: str
    files: list[Path]
    estimate: int  # frames, only to balance shards


Loader = Callable[[Item, Any], tuple[torch.Tensor, list[str]]]  # (item, progress bar) -> (codes [K, T], sources)


@dataclass(frozen=True)
class Request:
    """What `load_dataset` hands a source: the model, the source keyword's value and the options it may read."""

    model: LMModel
    value: Any  # the value of the source's keyword: a path, a count
    max_files: int | None  # keep the first N items of the full list (applied by the source, before any work)
    max_frames: int | None  # the crop load_dataset applies afterwards: a source may stop loading past it
    min_frames: int
    invalid_tokens: str  # EvalConfig.invalid_tokens, for sources that lay codes out
    fill: dict[str, str]  # text_fill and other_fill, for sources that lay codes out
    options: dict[str, Any]  # the source's own options (`DataSource.options`), by keyword


@dataclass(frozen=True)
class DataSource:
    name: str  # the keyword of load_dataset that selects it (the CLI's flag --name)
    options: tuple[str, ...]  # keywords of load_dataset only this source reads, passed in Request.options
    progress: str  # the progress bar's description ("loading codes")
    # List the items (nothing loaded yet) and say how to load one; raises DataError for a bad option or input.
    open: Callable[[Request], tuple[list[Item], Loader]]
    lays_out: bool = True  # its codes go through `layout_codes`, so bad fill options are its inputs' problem


SOURCES: dict[str, DataSource] = {}


def register(source: DataSource) -> DataSource:
    """Add `source`; a name already taken raises (two sources for one keyword would make the choice ambiguous)."""
    if source.name in SOURCES:
        raise ValueError(f"data source name {source.name!r} is taken")
    SOURCES[source.name] = source
    return source


def unregister(name: str) -> None:
    """Remove a source registered at run time (a test's)."""
    del SOURCES[name]


def option_name(name: str) -> str:
    """An option as both the library and the command line name it, `max_frames (--max-frames)`: the messages of
    the data layer reach API callers and CLI users alike."""
    return f"{name} (--{name.replace('_', '-')})"


for _module in pkgutil.iter_modules(__path__):  # the built-in sources: every module of this folder
    importlib.import_module(f"{__name__}.{_module.name}")
