"""Codes to evaluate, in the model's stream layout: from code files, from audio files through Mimi, or generated.

Moshi's layout: stream 0 text, streams 1..dep_q the model's own audio codebooks, the rest the user's audio.
This module reads codes files, lays codes out for the model, lists and groups audio files (LibriLight books) and
assembles the sequences of a run (`load_dataset`: bad files skipped and recorded on request, a minimum length, one
rank's length-balanced share; `load_sequences`: just the sequences); turning audio into codes lives in `audio`,
Mimi checkpoints in `mimi`. Every user-facing data problem raises `DataError` with one line naming the file and
what is wrong. The names that lived here before `audio`, `mimi` and `errors` were split out (see `__all__`) are
re-exported, so `from fused_stream.data import ...` keeps working.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel

from ..core.inputs import layout_codes
from ..errors import DataError, one_line
from .audio import CACHE_VERSION, DECODE_PIECE_SECONDS, ENCODE_CHUNK_FRAMES, crop_frames, encode_audio_file
from .mimi import MIMI_WEIGHTS, load_mimi, mimi_checkpoint, random_mimi, save_mimi_checkpoint, small_mimi_config

__all__ = [
    "AUDIO_SUFFIXES", "CACHE_VERSION", "CODES_SUFFIXES", "DECODE_PIECE_SECONDS", "ENCODE_CHUNK_FRAMES", "MIMI_WEIGHTS",
    "DataError", "Dataset", "EvalSequence", "assign_shards", "audio_files", "codes_files", "encode_audio_file",
    "generate_codes", "group_chapters", "load_codes_file", "load_dataset", "load_mimi",
    "load_sequences", "mimi_checkpoint", "natural_key", "random_mimi", "save_mimi_checkpoint", "small_mimi_config",
]

log = logging.getLogger(__name__)

CODES_SUFFIXES = (".pt", ".npy", ".safetensors")
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")


@dataclass
class EvalSequence:
    """One sequence to evaluate: codes [K, T] int64 in the model's full stream layout."""

    name: str  # file path relative to the input root without suffix, "speaker/book", or "generated_i"
    codes: torch.Tensor  # [K, T] int64
    sources: list[str] = field(default_factory=list)  # the files it came from, in order
    index: int = 0  # position in the full, unsharded list: results of several ranks merge back in data order

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


# ---------------------------------------------------------------------------------------------------- synthetic


def generate_codes(model: LMModel, n: int, frames: int | list[int], seed: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """Uniformly random tokens: text in [0, text_card), audio in [0, card).

    `frames` an int gives a tensor [n, K, frames]; a list of lengths gives a list of [K, T_i] tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = [frames] * n if isinstance(frames, int) else list(frames)
    if len(lengths) != n:
        raise ValueError(f"got {len(lengths)} lengths for {n} sequences")
    sequences = []
    for T in lengths:
        seq = torch.randint(0, model.card, (model.num_codebooks, T), generator=generator)
        seq[0] = torch.randint(0, model.text_card, (T,), generator=generator)
        sequences.append(seq)
    return torch.stack(sequences) if isinstance(frames, int) else sequences


# ---------------------------------------------------------------------------------------------------- code files


def load_codes_file(path: str | Path) -> torch.Tensor:
    """Codes [n, T] int64 from a .pt (tensor, or dict with one tensor / key "codes"), .npy or .safetensors file.

    A leading batch dimension of 1 is dropped; float values are accepted only when they are all whole numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"codes file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in CODES_SUFFIXES:
        raise DataError(f"codes file {path}: unsupported format {suffix!r}; use one of {', '.join(CODES_SUFFIXES)}")
    try:
        if suffix == ".pt":
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        else:
            from safetensors.torch import load_file

            obj = load_file(str(path))
    except Exception as exc:  # any reader failure is a bad file from the user's point of view
        raise DataError(f"codes file {path} is unreadable: {one_line(exc)}") from exc
    return _as_codes(_single_tensor(obj, path), path)


def _single_tensor(obj: Any, path: Path) -> torch.Tensor:
    if isinstance(obj, dict):
        if "codes" in obj:
            obj = obj["codes"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise DataError(f"codes file {path} holds keys {sorted(map(str, obj))}: store one tensor or key 'codes'")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iuf":
            raise DataError(f"codes file {path} has dtype {obj.dtype}: codes must be integers")
        obj = torch.from_numpy(obj.astype(np.float64 if obj.dtype.kind == "f" else np.int64))
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"codes file {path} holds a {type(obj).__name__}, not a tensor of codes")
    return obj


def _as_codes(codes: torch.Tensor, path: Path) -> torch.Tensor:
    shape = tuple(codes.shape)
    if codes.dim() == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.dim() != 2 or codes.numel() == 0:
        raise DataError(f"codes file {path} has shape {shape}: expected [n_codebooks, T] (or [1, n_codebooks, T])")
    if codes.dtype == torch.bool or codes.is_complex():
        raise DataError(f"codes file {path} has dtype {codes.dtype}: codes must be integers")
    if codes.is_floating_point():
        if not bool(torch.isfinite(codes).all()) or not torch.equal(codes, codes.round()):
            raise DataError(f"codes file {path} (shape {shape}) holds non-integer {codes.dtype} values")
    return codes.to(torch.int64)


def codes_files(path: str | Path) -> list[Path]:
    """A codes file → [it]; a directory → its .pt/.npy/.safetensors files (not recursive), natural order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"codes path {path} does not exist")
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CODES_SUFFIXES]
    if not files:
        raise DataError(f"codes directory {path} holds no {'/'.join(CODES_SUFFIXES)} files")
    return sorted(files, key=lambda p: natural_key(p.name))


# ---------------------------------------------------------------------------------------------------- files


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digit runs by value: chapter_2 before chapter_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _path_key(path: Path) -> list[list[Any]]:
    return [natural_key(part) for part in path.parts]


def audio_files(root: str | Path) -> list[Path]:
    """A file → [it]; a directory → its .flac/.wav/.mp3/.ogg files, recursively, in natural path order."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"audio path {root} does not exist")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    if not files:
        raise DataError(f"audio directory {root} holds no {'/'.join(AUDIO_SUFFIXES)} files")
    return sorted(files, key=_path_key)


def group_chapters(files: list[Path], root: Path) -> list[tuple[str, list[Path]]]:
    """LibriLight's root/speaker/book/chapter files grouped into ("speaker/book", chapters in natural order).

    Files outside that layout each form their own group, named by their path relative to `root` without suffix.
    """
    groups: dict[str, list[Path]] = {}
    for file in files:
        rel = _relative(file, root)
        name = "/".join(rel.parts[:2]) if len(rel.parts) == 3 else _stem_name(rel)
        groups.setdefault(name, []).append(file)
    return [(name, sorted(groups[name], key=lambda p: natural_key(p.name)))
            for name in sorted(groups, key=natural_key)]


def _relative(file: Path, root: Path) -> Path:
    try:
        rel = file.relative_to(root)
    except ValueError:
        return Path(file.name)
    return rel if rel.parts else Path(file.name)


def _stem_name(rel: Path) -> str:
    return rel.with_suffix("").as_posix()


# ---------------------------------------------------------------------------------------------------- sequences


@dataclass
class Dataset:
    """What `load_dataset` loaded: this rank's sequences in data order, and those that could not be used."""

    sequences: list[EvalSequence]
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"index", "name", "sources", "reason"}, data order
    total: int = 0  # sequences in the full list (max_files applied, not sharded): indices lie in [0, total)


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


def load_sequences(model: LMModel, **options: Any) -> list[EvalSequence]:
    """`load_dataset(model, **options).sequences`; with on_error="collect" the failures are only logged."""
    return load_dataset(model, **options).sequences


def load_dataset(
    model: LMModel, *, codes: str | Path | None = None, audio: str | Path | None = None,
    mimi: str | Path | None = None, generate: int | None = None, frames: int = 200, max_frames: int | None = None,
    concat_chapters: bool = False, text_fill: str = "zero", other_fill: str = "zero",
    cache_dir: str | Path | None = None, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
    max_files: int | None = None, on_error: str = "raise", min_frames: int = 1, shard: tuple[int, int] | None = None,
) -> Dataset:
    """The sequences to evaluate, in the model's layout, from exactly one of `codes`, `audio` (+ `mimi`), `generate`.

    `max_frames` crops every sequence; with `concat_chapters` each LibriLight book (speaker/book) is one sequence
    of its chapters in natural order, else each file is one. `max_files` keeps the first N of the full list. A
    sequence shorter than `min_frames` (before the crop), or with a bad file, raises `DataError` (`on_error=
    "raise"`) or is recorded in `failed` ("collect"). `shard=(rank, world_size)` loads this rank's share only
    (`assign_shards` over lengths estimated without encoding). Configuration errors raise in both modes.
    """
    if sum(x is not None for x in (codes, audio, generate)) != 1:
        raise DataError("give exactly one of --codes, --audio, --generate")
    for flag, value in (("--max-frames", max_frames), ("--max-files", max_files), ("--min-frames", min_frames)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    if on_error not in ("raise", "collect"):
        raise DataError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise DataError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    fill = {"text_fill": text_fill, "other_fill": other_fill}
    if generate is None:  # a one-frame probe raises bad fill options here, so "collect" never blames a file
        layout_codes(model, torch.zeros(model.dep_q, 1, dtype=torch.int64), **fill)
    load: _Loader
    if generate is not None:
        if generate < 1 or frames < 1:
            raise DataError(f"--generate needs >= 1 sequences of >= 1 frames, got {generate} x {frames}")
        batch = generate_codes(model, generate, frames, seed=seed)[:max_files]  # all of it: identical on every rank
        items = [_Item(i, f"generated_{i}", [], frames) for i in range(len(batch))]

        def load(item: _Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
            return batch[item.index].clone(), []
    elif codes is not None:
        root = Path(codes)
        files = codes_files(root)[:max_files]
        items = [_Item(i, _stem_name(_relative(f, root)), [f], _codes_frames(f)) for i, f in enumerate(files)]

        def load(item: _Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
            file = item.files[0]
            return layout_codes(model, load_codes_file(file), source=str(file), **fill), [str(file)]
    else:
        if mimi is None:
            raise DataError("--audio needs --mimi PATH (a Mimi .safetensors file or checkpoint directory)")
        items, load = _audio_items(model, Path(audio), mimi, max_frames, min_frames, max_files, concat_chapters,
                                   cache_dir, device, fill)
    owned = items
    if shard is not None:  # balance what evaluation will cost: the lengths after the max_frames crop
        lengths = [min(it.estimate, max_frames or it.estimate) for it in items]
        owned = [items[i] for i in assign_shards(lengths, [it.name for it in items], shard[1])[shard[0]]]
    from tqdm import tqdm

    dataset, done = Dataset([], [], len(items)), 0
    desc = "encoding audio" if audio is not None else "loading codes"
    with tqdm(total=sum(len(it.files) for it in owned), desc=desc, unit="file", disable=not progress) as bar:
        for item in owned:
            try:
                seq, used = load(item, bar)
                short = seq.shape[1] < min_frames
                reason = f"{seq.shape[1]} frames, shorter than --min-frames {min_frames}" if short else None
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


def _codes_frames(path: Path) -> int:
    """T of a codes file from its header (no data read), to balance shards; 0 if that fails (its owner reports it)."""
    try:
        if path.suffix.lower() == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[-1])
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return int(f.get_slice("codes" if "codes" in f.keys() else next(iter(f.keys()))).get_shape()[-1])
        return int(_single_tensor(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path).shape[-1])
    except Exception:  # any failure: the estimate only balances shards
        return 0


def _audio_items(
    model: LMModel, root: Path, mimi_path: str | Path, max_frames: int | None, min_frames: int,
    max_files: int | None, concat_chapters: bool, cache_dir: str | Path | None, device: str | torch.device,
    fill: dict[str, str],
) -> tuple[list[_Item], _Loader]:
    """The audio sequences to be, with lengths from file headers (nothing encoded yet), and how to encode one."""
    files = audio_files(root)
    base = root if root.is_dir() else root.parent
    _, config, _ = mimi_checkpoint(mimi_path)
    n_q, card = config["quantizer"].get("n_q"), config["quantizer"].get("bins")
    if card != model.card or not isinstance(n_q, int) or n_q < model.dep_q:
        raise DataError(f"Mimi {mimi_path} has {n_q} codebooks of card {card}; the model expects "
                        f"dep_q={model.dep_q} of card {model.card}")
    mimi, mimi_hash = load_mimi(mimi_path, model.dep_q, device)
    if mimi.channels != 1:  # else every file would fail alike in "collect" mode
        raise DataError(f"Mimi with {mimi.channels} channels is not supported: audio is mixed down to mono")
    groups = group_chapters(files, base) if concat_chapters else [(_stem_name(_relative(f, base)), [f]) for f in files]
    groups = groups[:max_files]
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
                reason = f"{type(exc).__name__}: {one_line(exc)}"
                raise DataError(f"audio file {chapter} cannot be encoded: {reason}") from exc
            bar.update(1)
        return layout_codes(model, torch.cat(parts, dim=1), source=item.name, **fill), used

    return items, load

