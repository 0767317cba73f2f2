"""data/librilight.py: audio files listed in natural order, LibriLight chapters grouped into books."""

from __future__ import annotations

from pathlib import Path

import pytest

from fused_stream.data.librilight import audio_files, group_chapters
from fused_stream.errors import DataError


def test_group_chapters_by_hand():
    root = Path("/data/large")
    files = [root / p for p in ["7/b/ch_2.flac", "7/b/ch_11.flac", "7/a/x.flac", "deep/er/than/that.flac",
                                "top.flac", "7/b/ch_1.flac"]]
    assert group_chapters(files, root) == [
        ("7/a", [root / "7/a/x.flac"]),
        ("7/b", [root / "7/b/ch_1.flac", root / "7/b/ch_2.flac", root / "7/b/ch_11.flac"]),
        ("deep/er/than/that", [root / "deep/er/than/that.flac"]),
        ("top", [root / "top.flac"]),
    ]


def test_audio_files_listing(tmp_path):
    for rel in ["b/2.wav", "b/10.FLAC", "a.mp3", "c.ogg", "notes.txt", "b/x.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert audio_files(tmp_path) == [tmp_path / p for p in ["a.mp3", "b/2.wav", "b/10.FLAC", "c.ogg"]]
    assert audio_files(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        audio_files(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        audio_files(tmp_path / "missing")


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_symlinked_directories_are_followed_once(tmp_path, caplog):
    """Python 3.11's rglob skips symlinked directories silently; here they are followed, each real one once."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _touch(root / "7/a/1.flac", elsewhere / "book/2.flac", elsewhere / "book/3.wav")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a speaker stored on another disk
    (root / "7/a/loop").symlink_to(root, target_is_directory=True)  # a loop: must neither hang nor repeat files
    (root / "twin").symlink_to(root / "7", target_is_directory=True)  # a second path to a listed directory
    (root / "gone.flac").symlink_to(tmp_path / "missing.flac")  # dangling
    # The old listing: rglob does not descend into linked/ (nor twin/), so 2.flac and 3.wav were skipped unsaid.
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["1.flac"]
    with caplog.at_level("WARNING"):
        files = audio_files(root)
    assert files == [root / "7/a/1.flac", root / "linked/book/2.flac", root / "linked/book/3.wav"]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3" in message  # each skip said, with why
    assert f"{root / 'twin'} (the same directory as {root / '7'}" in message
    assert f"{root / '7/a/loop'} (the same directory as {root}" in message
    assert f"{root / 'gone.flac'} (a link to nothing)" in message
    assert audio_files(root / "linked") == [root / "linked/book/2.flac", root / "linked/book/3.wav"]  # a linked root


def test_group_chapters_from_a_speaker_or_a_book_folder():
    """The same books, named alike, whether --audio points at the LibriLight root, a speaker or a book."""
    root = Path("/data/large")
    chapters = [root / p for p in ["7/b/ch_2.flac", "7/b/ch_11.flac", "7/a/x.flac", "7/b/ch_1.flac"]]
    expected = [("7/a", [root / "7/a/x.flac"]),
                ("7/b", [root / "7/b/ch_1.flac", root / "7/b/ch_2.flac", root / "7/b/ch_11.flac"])]
    assert group_chapters(chapters, root) == expected
    assert group_chapters(chapters, root / "7") == expected  # a speaker folder
    assert group_chapters(chapters + [root / "7/notes.wav"], root / "7") == [*expected, ("notes", [root /
                                                                                                   "7/notes.wav"])]
    assert group_chapters(chapters[:2] + chapters[3:], root / "7/b") == expected[1:]  # a book folder


def test_sequence_meta_reads_the_json_beside_the_audio_else_the_layout(tmp_path):
    from fused_stream.data.librilight import sequence_meta

    chapter = tmp_path / "103" / "1240" / "ch_1.flac"
    chapter.parent.mkdir(parents=True)
    chapter.write_bytes(b"")
    assert sequence_meta("103/1240/ch_1", [str(chapter)]) == {"speaker": "103", "book": "1240"}
    assert sequence_meta("103/1240", [str(chapter)]) == {"speaker": "103", "book": "1240"}  # a concatenated book
    chapter.with_suffix(".json").write_text('{"speaker": "7", "book_meta": {"id": "555"}, "snr": 9.1}')
    assert sequence_meta("103/1240/ch_1", [str(chapter)]) == {"speaker": "7", "book": "555"}
    flat = tmp_path / "a.flac"
    assert sequence_meta("a", [str(flat)]) == {"speaker": None, "book": None}  # no folder names a book
    assert sequence_meta("x/y", [str(tmp_path / "x" / "y.pt")]) == {"speaker": None, "book": None}  # codes
    assert sequence_meta("generated_0", []) == {"speaker": None, "book": None}
