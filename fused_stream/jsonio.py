"""Writing results safely: strict-JSON copies of evaluation data, and files replaced atomically.

Both are needed wherever results reach disk (the report files, the per-sequence partial results a run resumes
from), and both guard the same thing: the output of a long evaluation. A NaN would make a file that strict JSON
readers refuse, and a crash mid-write would leave half a file where a whole one was. This module is a leaf: it
imports nothing from the package, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def to_jsonable(obj: Any, where: str = "$") -> Any:
    """A strict-JSON copy of `obj`: NaN/inf -> None, numpy/torch scalars and arrays -> Python, tuples -> lists.

    Unknown objects become their `str()` with a warning rather than an error: this runs after a long evaluation,
    and losing the results over one odd field in a report would be the worse outcome.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.dim() else obj.item(), where)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj  # sets have no stable order
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    log.warning("%s: %s is not JSON data; writing its str()", where, type(obj).__name__)
    return str(obj)


def _json_key(key: Any) -> str:
    return key if isinstance(key, str) else str(to_jsonable(key))


def atomic_write(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temporary file in the same directory and `os.replace`.

    Same directory, because `os.replace` is atomic only within one file system. The temporary file is removed
    on any error, so a failure leaves the previous file (if any) untouched and nothing else behind. The file gets
    the mode of the file it replaces, or a new file's usual mode (0666 less the umask: 0644 under umask 022).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600: give the file the mode a plain open() would
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # os.replace may have consumed it already
            os.unlink(tmp)
        raise


def _file_mode(path: Path) -> int:
    """The permission bits `path` keeps if it exists, else those `open()` would give a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for row in f:
                if row.startswith("Umask:"):
                    return int(row.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
