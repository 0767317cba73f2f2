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
