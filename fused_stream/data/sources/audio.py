"""Audio through Mimi: each file (or, with concat_chapters or a book selection, each LibriLight book of chapters)
one sequence, its length estimated from the file headers before anything is encoded."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...core.inputs import layout_codes
from ...errors import DataError, is_device_fault, one_line
from ..audio import encode_audio_file
from ..librilight import audio_files, group_chapters, relative_name
from ..mimi import load_mimi, mimi_checkpoint
from . import DataSource, Item, Loader, Request, option_name, register


def open_audio(request: Request) -> tuple[list[Item], Loader]:
    """The audio sequences to be, with lengths from file headers (nothing encoded yet), and how to encode one."""
    model, options = request.model, request.options
    if options["mimi"] is None:
        raise DataError(f"{option_name('audio')} needs {option_name('mimi')}: a Mimi .safetensors file or checkpoint "
                        "directory")
    root = Path(request.value)
    files = audio_files(root)
    base = root if root.is_dir() else root.parent
    if options["selection"] is not None:  # the books a paper-metrics config names (before any Mimi work)
        groups = options["selection"].groups(files, base)
    elif options["concat_chapters"] and root.is_dir():  # a LibriLight root, a speaker's or a book's folder
        groups = group_chapters(files, base)
    else:
        groups = [(relative_name(f, base), [f]) for f in files]
    groups = groups[: request.max_files]
    checkpoint = mimi_checkpoint(options["mimi"])
    n_q, card = checkpoint.config["quantizer"].get("n_q"), checkpoint.config["quantizer"].get("bins")
    if card != model.card or not isinstance(n_q, int) or n_q < model.dep_q:
        raise DataError(f"Mimi {checkpoint.name} has {n_q} codebooks of card {card}; the model expects "
                        f"dep_q={model.dep_q} of card {model.card}")
    mimi, mimi_hash = load_mimi(checkpoint, model.dep_q, options["device"])
    if mimi.channels != 1:  # else every file would fail alike in "collect" mode
        raise DataError(f"Mimi with {mimi.channels} channels is not supported: audio is mixed down to mono")
    import sphn

    paths = [f for _, chapters in groups for f in chapters]
    seconds = dict(zip(paths, sphn.durations([str(f) for f in paths]), strict=True))  # None: unreadable, fails later
    items = [Item(i, name, chapters, sum(math.ceil((seconds[f] or 0) * mimi.frame_rate) for f in chapters))
             for i, (name, chapters) in enumerate(groups)]
    # Encode far enough to tell whether a sequence reaches min_frames, which may lie past the max_frames crop.
    max_frames = request.max_frames
    limit = None if max_frames is None else max(max_frames, request.min_frames)

    def load(item: Item, bar: Any) -> tuple[torch.Tensor, list[str]]:
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
                                               cache_dir=options["cache_dir"], max_frames=left))
            except (DataError, OSError, MemoryError, torch.cuda.OutOfMemoryError):
                raise  # memory, or a cache dir that cannot be written, is the run's problem, not this file's
            except Exception as exc:  # Mimi failing on one file is that file's problem: named, and collectable
                if is_device_fault(exc):
                    raise  # unless the GPU failed: that is no file's fault, and every later file would fail too
                reason = f"{type(exc).__name__}: {one_line(exc)}"
                raise DataError(f"audio file {chapter} cannot be encoded: {reason}") from exc
            bar.update(1)
        return layout_codes(model, torch.cat(parts, dim=1), source=item.name, from_mimi=True, **request.fill), used

    return items, load


SOURCE = register(DataSource(name="audio", options=("mimi", "concat_chapters", "cache_dir", "device", "selection"),
                             progress="encoding audio", open=open_audio))
