"""Which LibriLight books to evaluate, the way paper-metrics training configs choose them.

moshi-finetune paper-metrics configs pick their long-context data with `librilight_evaluation_mode` and its keys;
`BookSelection` gives each mode that meaning, over the books `librilight.group_chapters` finds:

- `single_book`: the book `speaker/book` (`librilight_speaker_id`, `librilight_book_name`), its first
  `max_chapters` chapters in reading order joined into one sequence;
  keys a config leaves out take legacy code's defaults (`CLIENT_DEFAULTS`: speaker 100, its Emerald City book, 3
  chapters, 1 book);
- `multi_book`: `num_books` books (`librilight_num_sequences`) among those with at least `max_chapters` chapters,
  each its first `max_chapters` chapters joined. Legacy code drew a new random sample at every evaluation, so the
  numbers it logged over training came from different books; here the sample is drawn once from `seed`, and every
  evaluation of a training run sees the same books;
- `pre_concatenated`: every file is one sequence (files made by joining chapters beforehand), in natural order.

Nothing is decoded here: a selection names files. A book that is not there, or too few books, raise `DataError`
naming what was looked for and what there is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .librilight import group_chapters, natural_key, relative_name

__all__ = ["CLIENT_DEFAULTS", "MODES", "BookSelection"]

MODES = ("single_book", "multi_book", "pre_concatenated")
# What legacy paper-metrics code used when a config named a mode but not these keys (its meaning, kept).
CLIENT_DEFAULTS = {"mode": "single_book", "speaker": "100", "book": "emerald_city_librivox_64kb_mp3",
                   "max_chapters": 3, "num_books": 1}


@dataclass(frozen=True)
class BookSelection:
    mode: str
    speaker: str | None = None
    book: str | None = None
    max_chapters: int | None = None  # None: every chapter
    num_books: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"librilight_evaluation_mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "single_book" and not (self.speaker and self.book):
            raise DataError("librilight_evaluation_mode single_book needs librilight_speaker_id and "
                            "librilight_book_name")
        for name in ("max_chapters", "num_books"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DataError(f"{name} must be an integer >= 1, got {value!r}")

    def describe(self) -> str:
        chapters = "all chapters" if self.max_chapters is None else f"first {self.max_chapters} chapters"
        if self.mode == "single_book":
            return f"book {self.speaker}/{self.book}, {chapters}"
        if self.mode == "multi_book":
            return f"{self.num_books} book(s) drawn with seed {self.seed} among those with enough chapters, {chapters}"
        return "every file one sequence (pre-concatenated)"

    def groups(self, files: list[Path], root: Path) -> list[tuple[str, list[Path]]]:
        """(sequence name, its files in reading order) per selected sequence, in data order."""
        if self.mode == "pre_concatenated":
            return [(relative_name(f, root), [f]) for f in files]
        books = group_chapters(files, root)
        if self.mode == "single_book":
            wanted = f"{self.speaker}/{self.book}"
            found = [(name, chapters) for name, chapters in books if name == wanted or name.endswith(f"/{wanted}")]
            if not found:
                names = ", ".join(name for name, _ in books[:5])
                raise DataError(f"book {wanted} not found under {root} ({len(books)} books there, e.g. {names})")
            return [(name, chapters[: self.max_chapters]) for name, chapters in found[:1]]
        need = self.max_chapters or 1
        eligible = [(name, chapters) for name, chapters in books if len(chapters) >= need]
        if len(eligible) < self.num_books:
            raise DataError(f"multi_book wants {self.num_books} books of at least {need} chapters under {root}; "
                            f"there are {len(eligible)} (of {len(books)} books)")
        chosen = random.Random(self.seed).sample(range(len(eligible)), self.num_books)
        picked = sorted((eligible[i] for i in chosen), key=lambda book: natural_key(book[0]))
        return [(name, chapters[: self.max_chapters]) for name, chapters in picked]
