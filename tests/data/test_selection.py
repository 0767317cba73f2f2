"""`data.selection`: the books a paper-metrics config names, over a LibriLight-like listing (nothing decoded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fused_stream.data.librilight import audio_files
from fused_stream.data.selection import BookSelection
from fused_stream.errors import DataError

BOOKS = {"100/emerald_city": 4, "100/oz": 2, "200/other": 3, "300/tiny": 1}


@pytest.fixture
def root(tmp_path) -> Path:
    for book, chapters in BOOKS.items():
        for i in range(1, chapters + 1):
            path = tmp_path / book / f"chapter_{i * 5}.flac"  # 5, 10, 15, 20: natural order differs from lexical
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return tmp_path


def _names(groups):
    return [(name, [f.name for f in files]) for name, files in groups]


def test_single_book_takes_its_first_chapters_in_reading_order(root):
    groups = BookSelection("single_book", speaker="100", book="emerald_city", max_chapters=3).groups(
        audio_files(root), root)
    assert _names(groups) == [("100/emerald_city", ["chapter_5.flac", "chapter_10.flac", "chapter_15.flac"])]
    # from a speaker folder the book keeps its name
    speaker = root / "100"
    groups = BookSelection("single_book", speaker="100", book="oz").groups(audio_files(speaker), speaker)
    assert _names(groups) == [("100/oz", ["chapter_5.flac", "chapter_10.flac"])]


def test_a_missing_book_names_what_is_there(root):
    with pytest.raises(DataError, match=r"book 100/nowhere not found under .* \(4 books there, e.g. 100/emerald"):
        BookSelection("single_book", speaker="100", book="nowhere").groups(audio_files(root), root)


def test_multi_book_is_seeded_and_needs_enough_chapters(root):
    files = audio_files(root)
    pick = BookSelection("multi_book", max_chapters=2, num_books=2, seed=3)
    first = _names(pick.groups(files, root))
    assert first == _names(pick.groups(files, root))  # the same books every time
    assert len(first) == 2 and all(len(chapters) == 2 for _, chapters in first)
    assert "300/tiny" not in [name for name, _ in first]  # one chapter: not eligible
    seen = {tuple(n for n, _ in BookSelection("multi_book", max_chapters=2, num_books=2, seed=s).groups(files, root))
            for s in range(20)}
    assert len(seen) > 1  # the seed chooses among the eligible books
    with pytest.raises(DataError, match="multi_book wants 4 books of at least 2 chapters .* there are 3"):
        BookSelection("multi_book", max_chapters=2, num_books=4).groups(files, root)


def test_pre_concatenated_takes_every_file(root):
    groups = BookSelection("pre_concatenated").groups(audio_files(root / "200"), root / "200")
    assert [name for name, _ in groups] == ["other/chapter_5", "other/chapter_10", "other/chapter_15"]


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "random"}, "not one of single_book"), ({"mode": "single_book"}, "needs librilight_speaker_id"),
    ({"mode": "multi_book", "num_books": 0}, "num_books must be an integer >= 1"),
])
def test_bad_selections_are_refused(kwargs, match):
    with pytest.raises(DataError, match=match):
        BookSelection(**kwargs)
