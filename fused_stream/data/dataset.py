"""The sequences of one run: from exactly one source (codes files, audio through Mimi, or random codes), checked,
cropped and shared out between ranks.

`load_dataset` is where the options a user gives (`max_files`, `min_frames`, `max_frames`, `concat_chapters`,
a rank's shard) meet the sources, so each applies the same way to every source: `max_files` to the full list, shards
balanced by length estimated from file headers before anything is encoded (a rank encodes only its own audio), and a
bad file either raising or, with on_error="collect", recorded in `Dataset.failed` with its reason while the run goes
on. Each source is a registered `data.sources.DataSource` (listing its items and loading one); below them, reading
codes files is `codes`, listing audio and grouping books `librilight`, encoding `audio`, Mimi checkpoints `mimi`;
every user-facing data problem raises `DataError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.alignment import valid_masks
from ..core.config import EvalConfig
from ..core.inputs import INVALID_TOKEN_POLICIES, check_tokens, crop_frames, layout_codes
from ..errors import DataError, one_line
from .codes import EvalSequence
from .librilight import natural_key
from .mimi import MimiCheckpoint, file_sha256
from .selection import BookSelection
from .sources import SOURCES, Item, Request, option_name

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """What `load_dataset` loaded: this rank's sequences in data order, and those that could not be used."""

    sequences: list[EvalSequence]
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"index", "name", "sources", "reason"}, data order
    total: int = 0  # sequences in the full list (max_files applied, not sharded): indices lie in [0, total)
    # {"index", "name", "sources", "same_as"}: sequences left out because their files hold the same content as an
    # earlier one's (a copy or a hard link); empty with allow_duplicates=True
    duplicates: list[dict[str, Any]] = field(default_factory=list)


def assign_shards(lengths: Sequence[int], names: Sequence[str], world_size: int) -> list[list[int]]:
    """Each rank's indices into the full list, in data order, balanced by length so that ranks finish together.

    Greedy longest processing time first: longest first (ties by name), each to the rank with the least total so
    far (ties to the lowest rank). Pure and deterministic, so every rank computes the same split without talking.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], natural_key(names[i]), i))
    totals = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        totals[rank] += lengths[i]
        ranks[rank].append(i)
    return [sorted(indices) for indices in ranks]


_LAYOUT = EvalConfig()  # how codes are laid out and cropped unless told otherwise: EvalConfig's defaults


def load_sequences(model: LMModel, **options: Any) -> list[EvalSequence]:
    """`load_dataset(model, **options).sequences`; with on_error="collect" the failures are only logged."""
    return load_dataset(model, **options).sequences


def load_dataset(
    model: LMModel, *, codes: str | Path | None = None, audio: str | Path | None = None,
    mimi: str | Path | MimiCheckpoint | None = None, generate: int | None = None, frames: int | None = None,
    max_frames: int | None = _LAYOUT.max_frames, concat_chapters: bool = False, text_fill: str = _LAYOUT.text_fill,
    other_fill: str = _LAYOUT.other_fill, invalid_tokens: str = _LAYOUT.invalid_tokens,
    cache_dir: str | Path | None = None, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
    max_files: int | None = None, on_error: str = "raise", min_frames: int = 1, shard: tuple[int, int] | None = None,
    selection: BookSelection | None = None, allow_duplicates: bool = False, **sources: Any,
) -> Dataset:
    """The sequences to evaluate, in the model's layout, from exactly one of `codes`, `audio` (+ `mimi`), `generate`
    or another registered data source (`data.sources`: its name and its options are further keywords).

    `max_frames` crops every sequence; with `concat_chapters` each LibriLight book (speaker/book) is one sequence
    of its chapters in natural order, else each file is one; `selection` (audio only) picks the books a paper-metrics
    config names instead (`data.selection`). `max_files` keeps the first N of the full list. A
    sequence shorter than `min_frames` (before the crop), or with a bad file, raises `DataError` (`on_error=
    "raise"`) or is recorded in `failed` ("collect"). A token outside the model's vocabularies is such a bad file
    with `invalid_tokens="raise"` (the error names the file, stream and frame; checked here, as `check_codes` does
    later); with "mask" the sequence loads as it is and the evaluator masks and counts those tokens.
    `shard=(rank, world_size)` loads this rank's share only (`assign_shards` over lengths estimated without
    encoding). Configuration errors raise in both modes.

    A sequence whose files hold the same content as an earlier sequence's (a copy, or a hard link, under another
    path) would count one unit twice in every mean and interval: it is left out with a warning naming both and
    listed in `Dataset.duplicates`, unless `allow_duplicates`. A sequence with no position to score (every token of
    the text and the model's audio streams the zero token, or masked) fails with "nothing to score".
    """
    given = {"codes": codes, "audio": audio, "generate": generate, "mimi": mimi, "frames": frames,
             "concat_chapters": concat_chapters, "cache_dir": cache_dir, "seed": seed, "device": device,
             "selection": selection, **sources}
    unknown = set(sources) - set(SOURCES) - {o for source in SOURCES.values() for o in source.options}
    if unknown:
        raise TypeError(f"load_dataset() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    chosen = [source for name, source in SOURCES.items() if given.get(name) is not None]
    if len(chosen) != 1:
        raise DataError(f"give exactly one of {', '.join(option_name(name) for name in SOURCES)}")
    (source,) = chosen
    for name, value in (("max_frames", max_frames), ("max_files", max_files), ("min_frames", min_frames)):
        if value is not None and value < 1:
            raise DataError(f"{option_name(name)} must be >= 1, got {value}")
    if on_error not in ("raise", "collect"):
        raise DataError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise DataError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if invalid_tokens not in INVALID_TOKEN_POLICIES:
        raise DataError(f"invalid_tokens must be one of {', '.join(INVALID_TOKEN_POLICIES)}, got {invalid_tokens!r}")
    fill = {"text_fill": text_fill, "other_fill": other_fill}
    if source.lays_out:  # a probe raises bad fill options here, so "collect" never blames a file
        layout_codes(model, torch.zeros(model.dep_q, model.dep_q + 1, dtype=torch.int64), **fill)
    request = Request(model, given[source.name], max_files, max_frames, min_frames, invalid_tokens, fill,
                      {option: given.get(option) for option in source.options})
    items, load = source.open(request)
    duplicates = [] if allow_duplicates else same_content(items)
    for item, first in duplicates:
        log.warning("%s has the same content as %s (identical files: %s and %s): evaluated once; %s evaluates "
                    "both", item.name, first.name, ", ".join(map(str, item.files)),
                    ", ".join(map(str, first.files)), option_name("allow_duplicates"))
    left_out = {item.index for item, _ in duplicates}
    owned = [it for it in items if it.index not in left_out]
    if shard is not None:  # balance what evaluation will cost: the lengths after the max_frames crop
        lengths = [min(it.estimate, max_frames or it.estimate) for it in owned]
        owned = [owned[i] for i in assign_shards(lengths, [it.name for it in owned], shard[1])[shard[0]]]
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    dataset, done = Dataset([], [], len(items)), 0
    dataset.duplicates = [{"index": item.index, "name": item.name, "sources": [str(f) for f in item.files],
                           "same_as": first.name} for item, first in duplicates]
    desc = source.progress
    files = sum(len(it.files) for it in owned)
    show = progress and files > 0  # generated codes read no file: no empty "0file" bar
    with tqdm(total=files, desc=desc, unit="file", disable=not show) as bar, \
            (logging_redirect_tqdm() if show else contextlib.nullcontext()):  # warnings on lines of their own
        for item in owned:
            try:
                seq, used = load(item, bar)
                if invalid_tokens == "raise":
                    check_tokens(model, seq, ", ".join(map(str, item.files)) or item.name)
                short = seq.shape[1] < min_frames
                reason = (f"{seq.shape[1]} frames, shorter than {option_name('min_frames')} {min_frames}" if short
                          else None)
                if reason is None and not scores_anything(model, crop_frames(seq, max_frames)):
                    reason = (f"nothing to score: every token of the text and the model's audio streams "
                              f"(1..{model.dep_q}) is the zero token {model.zero_token_id} or out of range")
            except DataError as exc:
                if on_error == "raise":
                    raise
                reason = one_line(exc)
            if reason is None:
                dataset.sequences.append(EvalSequence(item.name, crop_frames(seq, max_frames), used, item.index))
            elif on_error == "raise":
                raise DataError(f"{item.name} ({', '.join(map(str, item.files)) or 'generated'}): {reason}")
            else:
                log.warning("skipping %s: %s", item.name, reason)
                dataset.failed.append({"index": item.index, "name": item.name,
                                       "sources": [str(f) for f in item.files], "reason": reason})
            done += len(item.files)
            bar.update(done - bar.n)  # a book that failed or was cut short still counts all its chapters
    return dataset


def scores_anything(model: LMModel, codes: torch.Tensor) -> bool:
    """Whether codes [K, T] have a position `LMModel.forward` scores: a text or own-audio token in its vocabulary
    whose prediction step lies inside the sequence (an out-of-range token would be masked)."""
    audio, text = valid_masks(model, codes.unsqueeze(0), torch.tensor([codes.shape[1]]))
    audio_codes = codes[model.audio_offset : model.audio_offset + model.dep_q].unsqueeze(0)
    audio &= (audio_codes >= 0) & (audio_codes < model.card)
    text &= (codes[:1] >= 0).unsqueeze(0) & (codes[:1] < model.text_card).unsqueeze(0)
    return bool(audio.any()) or bool(text.any())


def same_content(items: list[Item]) -> list[tuple[Item, Item]]:
    """(item, the first earlier item whose files hold identical content) for every such item.

    Files are compared by size first, and hashed (sha256) only where sizes coincide, so a data set without copies
    costs one stat per file; both paths of a hard link are the same file and hash alike.
    """
    with_files = [it for it in items if it.files]
    by_sizes: dict[tuple[int, ...], list[Item]] = {}
    for item in with_files:
        try:
            sizes = tuple(f.stat().st_size for f in item.files)
        except OSError:  # unreadable: its load fails and says why
            continue
        by_sizes.setdefault(sizes, []).append(item)
    found: list[tuple[Item, Item]] = []
    for group in by_sizes.values():
        if len(group) < 2:
            continue
        seen: dict[tuple[str, ...], Item] = {}
        for item in group:
            try:
                digest = tuple(file_sha256(f) for f in item.files)
            except OSError:
                continue
            if digest in seen:
                found.append((item, seen[digest]))
            else:
                seen[digest] = item
    return sorted(found, key=lambda pair: pair[0].index)
