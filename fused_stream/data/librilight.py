"""Audio files on disk and LibriLight's books: which files to read, in which order, under which names.

LibriLight stores speech as root/speaker/book/chapter.flac; long-context evaluation wants a whole book as one
sequence, its chapters in reading order. File systems list names in arbitrary or lexical order (chapter_10 before
chapter_2), so every listing here sorts by `natural_key`: the same data gives the same sequences, in the same order,
on every machine and every rank. Nothing here decodes audio (that is `audio`); a missing or empty input raises
`DataError` naming the path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DataError

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")


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

    Files outside that layout each form their own group, named by `relative_name`.
    """
    groups: dict[str, list[Path]] = {}
    for file in files:
        rel = _relative(file, root)
        name = "/".join(rel.parts[:2]) if len(rel.parts) == 3 else _stem_name(rel)
        groups.setdefault(name, []).append(file)
    return [(name, sorted(groups[name], key=lambda p: natural_key(p.name)))
            for name in sorted(groups, key=natural_key)]


def relative_name(file: Path, root: Path) -> str:
    """A sequence's name: `file`'s path relative to `root` without suffix ("103/bookA/chapter_1"), or its stem
    when it does not lie under `root`."""
    return _stem_name(_relative(file, root))


def _relative(file: Path, root: Path) -> Path:
    try:
        rel = file.relative_to(root)
    except ValueError:
        return Path(file.name)
    return rel if rel.parts else Path(file.name)


def _stem_name(rel: Path) -> str:
    return rel.with_suffix("").as_posix()
