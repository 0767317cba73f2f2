"""Audio files on disk and LibriLight's books: which files to read, in which order, under which names.

LibriLight stores speech as root/speaker/book/chapter.flac; long-context evaluation wants a whole book as one
sequence, its chapters in reading order. File systems list names in arbitrary or lexical order (chapter_10 before
chapter_2), so every listing here sorts by `natural_key`: the same data gives the same sequences, in the same order,
on every machine and every rank. Nothing here decodes audio (that is `audio`); a missing or empty input raises
`DataError` naming the path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import DataError, one_line

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digit runs by value: chapter_2 before chapter_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _path_key(path: Path) -> list[list[Any]]:
    return [natural_key(part) for part in path.parts]


def audio_files(root: str | Path) -> list[Path]:
    """A file → [it]; a directory → its .flac/.wav/.mp3/.ogg files, recursively, in natural path order.

    Symlinked sub-directories are followed, each real directory listed once (`list_files`).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"audio path {root} does not exist")
    files = list_files(root, AUDIO_SUFFIXES, what="audio")
    if not files:
        raise DataError(f"audio directory {root} holds no {'/'.join(AUDIO_SUFFIXES)} files")
    return files


def list_files(root: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files under directory `root` whose suffix (any case) is in `suffixes`, recursively, in natural path order.

    Why not `Path.rglob`: up to Python 3.12 it does not descend into symlinked directories, so their files would
    be skipped without a word. Here symlinked directories are followed, and each real directory (device, inode) is
    listed once, breadth first (a shallower path wins; siblings in natural order): a link loop neither hangs nor
    repeats files. What is left out - a directory already listed under another path, an unreadable directory, a
    dangling link with a listed suffix - is logged in one warning with the reason. Paths keep the names they were
    reached by (a file in root/link/ is root/link/file), so names relative to `root` follow the links.
    """
    listed: dict[tuple[int, int], Path] = {}
    files: list[Path] = []
    skipped: list[str] = []
    queue = deque([root])
    while queue:
        directory = queue.popleft()
        try:
            stat = directory.stat()
            key = (stat.st_dev, stat.st_ino)
            if key in listed:
                skipped.append(f"{directory} (the same directory as {listed[key]}: listed once)")
                continue
            listed[key] = directory
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: natural_key(e.name))
        except OSError as exc:
            skipped.append(f"{directory} (unreadable: {one_line(exc)})")
            continue
        for entry in entries:
            path = directory / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                skipped.append(f"{path} ({one_line(exc)})")
                continue
            if is_dir:
                queue.append(path)
            elif path.suffix.lower() in suffixes:
                if is_file:
                    files.append(path)
                elif entry.is_symlink():
                    skipped.append(f"{path} (a link to nothing)")
    if skipped:
        log.warning("listing %s files under %s, skipped %d: %s", what, root, len(skipped), "; ".join(skipped))
    return sorted(files, key=_path_key)


def group_chapters(files: list[Path], root: Path) -> list[tuple[str, list[Path]]]:
    """Chapters grouped into books ("speaker/book", chapters in natural order), whichever LibriLight level `root` is.

    LibriLight stores root/speaker/book/chapter files. `root` may be that root, one speaker's folder or one book's
    folder: the level is read from how deep the files lie. If any file lies 3 levels below `root` it is the
    LibriLight root and those files group by their "speaker/book" path; else if any lies 2 levels below it is a
    speaker folder and those files group by book, named "<root's name>/book"; else (all directly in `root`) it is
    one book folder, named "<root's parent's name>/<root's name>". A book is thus named alike from each level.
    Files at other depths each form their own group, named by `relative_name`.
    """
    rels = [(file, _relative(file, root)) for file in files]
    depth = next((d for d in (3, 2, 1) if any(len(rel.parts) == d for _, rel in rels)), 0)
    names = Path(os.path.abspath(root)).parts[1:]  # without the anchor: "/data/ll/103" -> ("data", "ll", "103")
    prefix = list(names[max(len(names) - (3 - depth), 0):]) if depth < 3 else []  # the levels above `root`
    groups: dict[str, list[Path]] = {}
    for file, rel in rels:
        book = "/".join([*prefix, *rel.parts[:-1]]) if len(rel.parts) == depth else ""
        name = book or _stem_name(rel)
        groups.setdefault(name, []).append(file)
    level = {3: "a LibriLight root", 2: "a speaker folder", 1: "a book folder"}.get(depth)
    if level:
        log.info("grouping chapters into books: %s is %s", root, level)
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


def sequence_meta(name: str, sources: list[str]) -> dict[str, str | None]:
    """The speaker and book of a sequence, where its data names them (else None):

    - LibriLight's per-file `.json` beside the first source audio file: `speaker` and `book_meta.id`;
    - else LibriLight's layout, `speaker/book/chapter.flac`, when the sequence's name has a folder part (the file
      lay below a book folder, or the sequence is a `--concat-chapters` book): the first source's folder is the
      book, the folder above it the speaker. Audio files directly in the given folder, codes files and generated
      sequences name no book.
    """
    meta: dict[str, str | None] = {"speaker": None, "book": None}
    if not sources or Path(sources[0]).suffix.lower() not in AUDIO_SUFFIXES:
        return meta
    first = Path(sources[0])
    try:
        info = json.loads(first.with_suffix(".json").read_text())
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict):
        book = info.get("book_meta")
        book_id = book.get("id") if isinstance(book, dict) else None
        meta["speaker"] = None if info.get("speaker") is None else str(info["speaker"])
        meta["book"] = None if book_id is None else str(book_id)
    if "/" in name and (meta["book"] is None or meta["speaker"] is None):
        meta["book"] = meta["book"] or first.parent.name
        meta["speaker"] = meta["speaker"] or (first.parent.parent.name or None)
    return meta
