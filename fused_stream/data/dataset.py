"""The sequences of one run: from exactly one source (codes files, audio through Mimi, or random codes), checked,
cropped and shared out between ranks.

`load_dataset` is where the options a user gives (`max_files`, `min_frames`, `max_frames`, `concat_chapters`,
a rank's shard) meet the sources, so each applies the same way to every source: `max_files` to the full list, shards
balanced by length estimated from file headers before anything is encoded (a rank encodes only its own audio), and a
bad file either raising or, with on_error="collect", recorded in `Dataset.failed` with its reason while the run goes
on. Reading codes files is `codes`, listing audio and grouping books `librilight`, encoding `audio`, Mimi checkpoints
`mimi`; every user-facing data problem raises `DataError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..core.alignment import valid_masks
from ..core.config import EvalConfig
from ..core.inputs import INVALID_TOKEN_POLICIES, check_tokens, crop_frames, layout_codes
from ..errors import DataError, is_device_fault, one_line
from .audio import encode_audio_file
from .codes import EvalSequence, codes_file_frames, codes_files, generate_codes, load_codes_file
from .librilight import audio_files, group_chapters, natural_key, relative_name
from .mimi import MimiCheckpoint, file_sha256, load_mimi, mimi_checkpoint
from .selection import BookSelection

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


@dataclass
class _Item:
    """One sequence to be: a generated tensor, a codes file, an audio file or a book of chapters."""

    index: int
    name: str
    files: list[Path]
    estimate: int  # frames, only to balance shards


_Loader = Callable[[_Item, Any], tuple[torch.Tensor, list[str]]]  # (item, progress bar) -> (codes [K, T], sources)


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
    selection: BookSelection | None = None, allow_duplicates: bool = False,
) -> Dataset:
    """The sequences to evaluate, in the model's layout, from exactly one of `codes`, `audio` (+ `mimi`), `generate`.

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
    if sum(x is not None for x in (codes, audio, generate)) != 1:
        raise DataError("give exactly one of codes, audio, generate (--codes, --audio, --generate)")
    for name, value in (("max_frames", max_frames), ("max_files", max_files), ("min_frames", min_frames)):
        if value is not None and value < 1:
            raise DataError(f"{_option(name)} must be >= 1, got {value}")
    if on_error not in ("raise", "collect"):
        raise DataError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise DataError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if invalid_tokens not in INVALID_TOKEN_POLICIES:
        raise DataError(f"invalid_tokens must be one of {', '.join(INVALID_TOKEN_POLICIES)}, got {invalid_tokens!r}")
    fill = {"text_fill": text_fill, "other_fill": other_fill}
    if generate is None:  # a probe raises bad fill options here, so "collect" never blames a file
        layout_codes(model, torch.zeros(model.dep_q, model.dep_q + 1, dtype=torch.int64), **fill)
    load: _Loader
    if generate is not None:
        if frames is None:
            raise DataError(f"{_option('generate')} needs {_option('frames')}: the length of each generated sequence")
        if generate < 1 or frames < 1:
            raise DataError(f"{_option('generate')} needs >= 1 sequences of >= 1 frames, got {generate} x {frames}")
        batch = generate_codes(model, generate, frames, seed=seed)[:max_files]  # all of it: identical on every rank
        items = [_Item(i, f"generated_{i}", [], frames) for i in range(len(batch))]

        def load(item: _Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
            return batch[item.index].clone(), []
    elif codes is not None:
        root = Path(codes)
        files = codes_files(root)[:max_files]
        items = [_Item(i, relative_name(f, root), [f], codes_file_frames(f)) for i, f in enumerate(files)]

        def load(item: _Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
            file = item.files[0]
            laid = layout_codes(model, load_codes_file(file), source=str(file), invalid_tokens=invalid_tokens, **fill)
            return laid, [str(file)]
    else:
        if mimi is None:
            raise DataError(f"{_option('audio')} needs {_option('mimi')}: a Mimi .safetensors file or checkpoint "
                            "directory")
        items, load = _audio_items(model, Path(audio), mimi, max_frames, min_frames, max_files, concat_chapters,
                                   cache_dir, device, fill, selection)
    duplicates = [] if allow_duplicates else same_content(items)
    for item, first in duplicates:
        log.warning("%s has the same content as %s (identical files: %s and %s): evaluated once; %s evaluates "
                    "both", item.name, first.name, ", ".join(map(str, item.files)),
                    ", ".join(map(str, first.files)), _option("allow_duplicates"))
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
    desc = "encoding audio" if audio is not None else "loading codes"
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
                reason = f"{seq.shape[1]} frames, shorter than {_option('min_frames')} {min_frames}" if short else None
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


def _option(name: str) -> str:
    """An option as both the library and the command line name it, `max_frames (--max-frames)`: the messages of
    `load_dataset` reach API callers and CLI users alike."""
    return f"{name} (--{name.replace('_', '-')})"


def scores_anything(model: LMModel, codes: torch.Tensor) -> bool:
    """Whether codes [K, T] have a position `LMModel.forward` scores: a text or own-audio token in its vocabulary
    whose prediction step lies inside the sequence (an out-of-range token would be masked)."""
    audio, text = valid_masks(model, codes.unsqueeze(0), torch.tensor([codes.shape[1]]))
    audio_codes = codes[model.audio_offset : model.audio_offset + model.dep_q].unsqueeze(0)
    audio &= (audio_codes >= 0) & (audio_codes < model.card)
    text &= (codes[:1] >= 0).unsqueeze(0) & (codes[:1] < model.text_card).unsqueeze(0)
    return bool(audio.any()) or bool(text.any())


def same_content(items: list[_Item]) -> list[tuple[_Item, _Item]]:
    """(item, the first earlier item whose files hold identical content) for every such item.

    Files are compared by size first, and hashed (sha256) only where sizes coincide, so a data set without copies
    costs one stat per file; both paths of a hard link are the same file and hash alike.
    """
    with_files = [it for it in items if it.files]
    by_sizes: dict[tuple[int, ...], list[_Item]] = {}
    for item in with_files:
        try:
            sizes = tuple(f.stat().st_size for f in item.files)
        except OSError:  # unreadable: its load fails and says why
            continue
        by_sizes.setdefault(sizes, []).append(item)
    found: list[tuple[_Item, _Item]] = []
    for group in by_sizes.values():
        if len(group) < 2:
            continue
        seen: dict[tuple[str, ...], _Item] = {}
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


def _audio_items(
    model: LMModel, root: Path, mimi_path: str | Path | MimiCheckpoint, max_frames: int | None, min_frames: int,
    max_files: int | None, concat_chapters: bool, cache_dir: str | Path | None, device: str | torch.device,
    fill: dict[str, str], selection: BookSelection | None = None,
) -> tuple[list[_Item], _Loader]:
    """The audio sequences to be, with lengths from file headers (nothing encoded yet), and how to encode one."""
    files = audio_files(root)
    base = root if root.is_dir() else root.parent
    if selection is not None:  # the books a paper-metrics config names (before any Mimi work)
        groups = selection.groups(files, base)
    elif concat_chapters and root.is_dir():  # a LibriLight root, a speaker's or a book's folder: books by chapters
        groups = group_chapters(files, base)
    else:
        groups = [(relative_name(f, base), [f]) for f in files]
    groups = groups[:max_files]
    checkpoint = mimi_checkpoint(mimi_path)
    n_q, card = checkpoint.config["quantizer"].get("n_q"), checkpoint.config["quantizer"].get("bins")
    if card != model.card or not isinstance(n_q, int) or n_q < model.dep_q:
        raise DataError(f"Mimi {checkpoint.name} has {n_q} codebooks of card {card}; the model expects "
                        f"dep_q={model.dep_q} of card {model.card}")
    mimi, mimi_hash = load_mimi(checkpoint, model.dep_q, device)
    if mimi.channels != 1:  # else every file would fail alike in "collect" mode
        raise DataError(f"Mimi with {mimi.channels} channels is not supported: audio is mixed down to mono")
    import sphn

    paths = [f for _, chapters in groups for f in chapters]
    seconds = dict(zip(paths, sphn.durations([str(f) for f in paths]), strict=True))  # None: unreadable, fails later
    items = [_Item(i, name, chapters, sum(math.ceil((seconds[f] or 0) * mimi.frame_rate) for f in chapters))
             for i, (name, chapters) in enumerate(groups)]
    # Encode far enough to tell whether a sequence reaches min_frames, which may lie past the max_frames crop.
    limit = None if max_frames is None else max(max_frames, min_frames)

    def load(item: _Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
        parts: list[torch.Tensor] = []
        used: list[str] = []
        for chapter in item.files:
            done = sum(p.shape[1] for p in parts)
            if limit is not None and done >= limit:
                break  # the rest of the book would be cropped away (and is not needed for min_frames)
            if max_frames is None or done < max_frames:
                used.append(str(chapter))  # a chapter encoded only for the min_frames check is not a source
            left = None if limit is None else limit - done
            try:
                parts.append(encode_audio_file(mimi, chapter, num_codebooks=model.dep_q, mimi_hash=mimi_hash,
                                               cache_dir=cache_dir, max_frames=left))
            except (DataError, OSError, MemoryError, torch.cuda.OutOfMemoryError):
                raise  # memory, or a cache dir that cannot be written, is the run's problem, not this file's
            except Exception as exc:  # Mimi failing on one file is that file's problem: named, and collectable
                if is_device_fault(exc):
                    raise  # unless the GPU failed: that is no file's fault, and every later file would fail too
                reason = f"{type(exc).__name__}: {one_line(exc)}"
                raise DataError(f"audio file {chapter} cannot be encoded: {reason}") from exc
            bar.update(1)
        return layout_codes(model, torch.cat(parts, dim=1), source=item.name, from_mimi=True, **fill), used

    return items, load
