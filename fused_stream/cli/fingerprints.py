"""Cheap content fingerprints of the files a saved result depends on: checkpoints, Mimi, codes and audio files.

`--resume` reuses saved results only when what produced them is unchanged, and a path says nothing about what is
at it now. A file's fingerprint is its size, its modification time (ns) and the sha256 of sampled blocks (first,
middle and last MiB; the whole file when it is no larger than those): a few MiB read however large the file, so
a 15 GB checkpoint costs milliseconds. An edit that keeps the size and the modification time and touches no
sampled byte would pass, which takes deliberate effort; anything that rewrites the file changes its mtime.
Each fingerprint is computed once per run (cached by the file's identity and stat).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

BLOCK = 1 << 20  # bytes per sampled block


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"size", "mtime_ns", "sha256_sampled"} of the file at `path` (OSError when it cannot be read)."""
    st = os.stat(path)
    return dict(_fingerprint(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=65536)
def _fingerprint(real: str, dev: int, ino: int, size: int, mtime_ns: int) -> tuple[tuple[str, Any], ...]:
    digest = hashlib.sha256(str(size).encode())
    with open(real, "rb") as f:
        if size <= 3 * BLOCK:
            digest.update(f.read())
        else:
            for offset in (0, size // 2 - BLOCK // 2, size - BLOCK):
                f.seek(offset)
                digest.update(f.read(BLOCK))
    return (("size", size), ("mtime_ns", mtime_ns), ("sha256_sampled", digest.hexdigest()))


def sources_fingerprint(paths: list[str]) -> dict[str, Any]:
    """{path: fingerprint} of a sequence's source files; a file that cannot be read is recorded as None."""
    out: dict[str, Any] = {}
    for path in paths:
        try:
            out[str(path)] = file_fingerprint(path)
        except OSError:
            out[str(path)] = None
    return out
