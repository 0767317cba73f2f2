"""One run per output folder: OUT/.lock, created atomically, held for the whole run, removed at its end.

Two runs writing the same --out would interleave their partial results and reports. The lock file is created with
O_CREAT | O_EXCL (exactly one creator wins, on local and NFSv3+ file systems alike) and holds its owner's pid, host
and start time, so a second run fails at once naming them. A lock left by a run that died without cleaning up
(SIGKILL, power loss) is stale when its host is this host and its pid is no longer alive: it is taken over with a
warning. A lock from another host is never judged stale: only its owner, or a person, can remove it. The lock is
removed at the end of the run, also on errors and interrupts, and so are the folders it had to create, if the run
left them empty.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FusedStreamError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class OutputLockedError(FusedStreamError, RuntimeError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def output_lock(out: str | Path, *, enabled: bool = True) -> Iterator[Path | None]:
    """Hold OUT/.lock for the duration of the block (`enabled=False`: a no-op, for ranks other than 0)."""
    if not enabled:
        yield None
        return
    out = Path(out)
    created = _make_dirs(out)
    path = out / LOCK_NAME
    try:
        token = _acquire(path)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield path
    finally:
        _release(path, token)
        _remove_empty(created)


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _acquire(path: Path) -> bytes:
    me = _owner()
    token = (json.dumps(me) + "\n").encode()
    for _ in range(3):  # a stale lock removed under us by another starting run: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            content, holder = _read(path)
            if content is None:
                continue  # released between our open and our read
            if not _is_stale(holder, me):
                raise OutputLockedError(_held_message(path, holder)) from None
            log.warning("taking over the stale lock %s: its run (pid %s on %s, started %s) is no longer alive",
                        path, holder.get("pid"), holder.get("host"), holder.get("started"))
            _remove_if(path, content)
            continue
        try:
            os.write(fd, token)
            os.fsync(fd)
        finally:
            os.close(fd)
        return token
    raise OutputLockedError(f"could not take the lock {path}: other runs keep creating it; is another run starting "
                            "on the same --out?")


def _read(path: Path) -> tuple[bytes | None, dict[str, Any]]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None, {}
    try:
        holder = json.loads(content)
    except ValueError:
        holder = {}
    return content, holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if holder.get("host") != me["host"] or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # another host, or a lock we cannot read: never guessed stale
    if pid == me["pid"]:
        return False  # this very process holds it (a run inside a run)
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _held_message(path: Path, holder: dict[str, Any]) -> str:
    if "pid" in holder:
        owner = f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    else:
        owner = "an unknown owner (the lock file is unreadable)"
    return (f"--out {path.parent} is in use by another run: {path} is held by {owner}; wait for it to finish, use "
            f"another --out, or delete {path} if no run is using that folder")


def _remove_if(path: Path, content: bytes) -> None:
    """Remove the lock at `path` if it still holds `content` (a run that took it over meanwhile keeps its own)."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == content:
            path.unlink()


def _release(path: Path, token: bytes) -> None:
    try:
        _remove_if(path, token)
    except OSError as exc:  # the run's results are written: a lock that cannot be removed is only reported
        log.warning("could not remove the lock %s: %s", path, exc)


def _make_dirs(out: Path) -> list[Path]:
    """Create `out` and its missing parents; the folders created, outermost first."""
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: the run wrote something there, and so into every parent
