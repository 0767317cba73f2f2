"""Nothing lost: each sequence's per-position sums are saved the moment its batch completes, and a rerun resumes.

Layout: OUT/partial/<store name of the label>/run.json (what produced them) and one `<hash of name>.pt` per
finished sequence holding its PositionSums, frame count, a hash of its codes, fingerprints of its source files and
its per-file metrics. Every file is written to a temporary name and renamed, so a kill at any instant leaves
either the old file or the new one, never half of one.

run.json holds the run's fingerprint: every setting that changes a number and the content fingerprints of the model
weights and the Mimi (`fingerprints`). `--resume` refuses to mix with results whose fingerprint differs, naming what
changed. A saved sequence is reused only when its codes hash to the same value and its source files still have the
fingerprints they had; otherwise it is recomputed.

Final metrics are always computed from these per-sequence files, added in data order, whether the run was
interrupted or not: an interrupted-and-resumed run therefore gives bit-identical sums to an uninterrupted one.

Beside them: `batch_in_progress.torch` (+ `.json`: what it holds, for the interrupt message), the batch in progress
saved mid-stream by the driver (`engine.checkpoint`), removed when that batch is saved whole; and `sessions/<n>.json`,
the report of each run that streamed here (throughput, verification, memory, ...), so that a resumed run's report
still holds what the earlier runs measured. Each sequence's entry keeps its own part of the report (its TTT
statistics, the session that computed it). """

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import string
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import FusedStreamError, one_line
from ..jsonio import atomic_write, to_jsonable
from ..metrics import PositionSums
from .fingerprints import sources_fingerprint

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STREAM_FILE = "batch_in_progress.torch"  # saved mid-stream; not *.pt, the finished sequences' suffix
STREAM_NOTE = "batch_in_progress.json"  # what STREAM_FILE holds, readable without loading it
SESSIONS = "sessions"


class ResumeMismatchError(FusedStreamError, ValueError):
    """--resume found partial results made with other settings or inputs."""


def codes_digest(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


_READABLE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SAFE = set(string.ascii_letters + string.digits + "-_.")


def store_name(label: str) -> str:
    """The folder name of `label`'s partial results, one per label on any file system.

    A label of lower-case letters, digits and `._-` (starting with a letter or digit, at most 64 characters) is
    its own name; any other gets its safe characters plus `~` and a hash of the exact label. No readable name holds
    `~`, and the hashes differ, so two labels never share a folder, even where names ignore case.
    """
    if _READABLE.fullmatch(label):
        return label
    cleaned = "".join(c if c in _SAFE else "_" for c in label)[:48]
    return f"{cleaned or 'model'}~{hashlib.sha256(label.encode()).hexdigest()[:12]}"


def partial_dir(out: str | Path, label: str) -> Path:
    return Path(out) / "partial" / store_name(label)


def check_resume(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Raise ResumeMismatchError naming what differs when `directory` holds results of another fingerprint."""
    run_file = directory / RUN_FILE
    if not run_file.exists():
        return
    now = to_jsonable(fingerprint)
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeMismatchError(f"--resume: cannot read {run_file} ({exc}); rerun without --resume, or use a new "
                                  "--out") from None
    if not isinstance(saved, dict):
        saved = {}
    if saved != now:
        changed = ", ".join(_describe(k, saved.get(k), now.get(k))
                            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
        raise ResumeMismatchError(
            f"--resume: the partial results in {directory} were made with other settings or inputs ({changed}); "
            "rerun with the same options and files, without --resume, or with a new --out"
        )


def _describe(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and "sha256_sampled" in old and "sha256_sampled" in new:
        return f"{key}: the file changed on disk"
    return f"{key}: {_short(old)} -> {_short(new)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def entry_path(directory: Path, name: str) -> Path:
    """The file of sequence `name`'s saved result in a partial folder."""
    return directory / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.pt"


def read_saved(directory: Path, name: str) -> dict[str, Any] | None:
    """Sequence `name`'s saved entry as it is on disk (its name, frames, `codes_sha256`, sums, metrics), or None
    when there is none: for reading a finished run's results, not for resuming (which checks codes and sources)."""
    path = entry_path(directory, name)
    if not path.exists():
        return None
    entry = torch.load(path, map_location="cpu", weights_only=True)
    return entry if isinstance(entry, dict) and entry.get("name") == name else None


class PartialStore:
    """The per-sequence results of one model's run under `out/partial/<store name of label>/`."""

    def __init__(self, out: str | Path, label: str, fingerprint: dict[str, Any], *, resume: bool,
                 rank: int = 0) -> None:
        self.dir = partial_dir(out, label)
        # Files of one rank under torchrun (the batch in progress, the sessions): ranks share the folder.
        self.rank_suffix = f".rank{rank}" if rank else ""
        self.fingerprint = to_jsonable(fingerprint)
        if resume:
            check_resume(self.dir, self.fingerprint)
        elif self.dir.exists():
            shutil.rmtree(self.dir)  # a fresh run never mixes in an older run's sequences
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / RUN_FILE, (json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n").encode())

    def _path(self, name: str) -> Path:
        return entry_path(self.dir, name)

    # --- the batch in progress (engine.checkpoint.StreamCheckpoints)
    def load_stream(self) -> dict[str, Any] | None:
        path = self._own(STREAM_FILE)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state means: redo that batch (an interrupt is no Exception)
            log.warning("the saved batch state %s is unreadable (%s): that batch is redone", path, one_line(exc))
            return None
        return state if isinstance(state, dict) else None

    def save_stream(self, state: dict[str, Any]) -> None:
        _atomic_torch_save(state, self._own(STREAM_FILE))
        note = {k: state.get(k) for k in ("frames_done", "frames_total")} | {"sequences": len(state["digests"]),
                                                                             "saved_at": time.time()}
        atomic_write(self._own(STREAM_NOTE), (json.dumps(note) + "\n").encode())

    def clear_stream(self) -> None:
        for name in (STREAM_NOTE, STREAM_FILE):  # the note first: it never describes a state that is gone
            self._own(name).unlink(missing_ok=True)

    def _own(self, name: str) -> Path:
        """This rank's file `name` (rank 0: `name` itself)."""
        stem, dot, suffix = name.partition(".")
        return self.dir / f"{stem}{self.rank_suffix}{dot}{suffix}"

    # --- the reports of the runs that streamed here
    def new_session(self) -> int:
        """The number of this run among those that streamed into this folder (1, 2, ...)."""
        folder = self._own(SESSIONS)
        folder.mkdir(exist_ok=True)
        numbers = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()]
        return max(numbers, default=0) + 1

    def save_session(self, session: int, report: dict[str, Any]) -> None:
        path = self._own(SESSIONS) / f"{session}.json"
        atomic_write(path, (json.dumps(to_jsonable(report), indent=1, sort_keys=True) + "\n").encode())

    def sessions(self) -> dict[int, dict[str, Any]]:
        """{session: its report} of every run that streamed here and saved its report, oldest first."""
        out = {}
        for path in sorted(self._own(SESSIONS).glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
            try:
                out[int(path.stem)] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring the unreadable session report %s (%s)", path, one_line(exc))
        return out

    def load(self, name: str, codes: torch.Tensor, sources: list[str] | None = None) -> dict[str, Any] | None:
        """The saved entry of sequence `name` if it exists, was computed on exactly these codes and (given
        `sources`) its source files are unchanged; None otherwise (the sequence is then recomputed)."""
        path = self._path(name)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            log.warning("partial result %s is unreadable (%s): recomputing %s", path, exc, name)
            return None
        if not isinstance(entry, dict) or entry.get("name") != name or entry.get("codes_sha256") != codes_digest(codes):
            log.warning("partial result for %s was computed on other codes: recomputing it", name)
            return None
        if sources is not None:
            saved, now = entry.get("sources"), sources_fingerprint(sources)
            saved = saved if isinstance(saved, dict) else {}
            if saved != now:
                changed = sorted((set(now) ^ set(saved)) | {p for p in now if saved.get(p) != now[p]})
                log.warning("the source files of %s changed since its result was saved (%s): recomputing it", name,
                            ", ".join(changed))
                return None
        return entry

    def sums(self, entry: dict[str, Any]) -> PositionSums:
        return PositionSums.from_state_dict(entry["sums"])

    def save(self, name: str, codes: torch.Tensor, sums: PositionSums, metrics: dict[str, Any],
             sources: list[str] | None = None, report: dict[str, Any] | None = None) -> None:
        """`report`: this sequence's part of the run's report (plain JSON data: its TTT statistics, its session)."""
        entry = {
            "name": name, "frames": int(codes.shape[-1]), "codes_sha256": codes_digest(codes),
            "sources": sources_fingerprint(sources or []), "sums": sums.state_dict(), "metrics": metrics,
            "report": json.dumps(to_jsonable(report or {})),  # a string: weights_only loading takes any JSON
        }
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        atomic_write(self._path(name), buffer.getvalue())


def entry_report(entry: dict[str, Any]) -> dict[str, Any]:
    """The sequence's part of the report saved with `entry` ({} for entries saved before reports were kept)."""
    try:
        report = json.loads(entry.get("report") or "{}")
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never half a file, and no second copy in memory
    (a saved stream state can be gigabytes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def describe_saved(out: str | Path) -> str:
    """What an interrupted run leaves in OUT/partial and what a `--resume` would redo, for the interrupt message."""
    try:
        return _describe_saved(Path(out) / "partial")
    except OSError as exc:  # the message of an interrupt must not fail
        return f"could not read what is saved in {Path(out) / 'partial'} ({one_line(exc)})"


def _describe_saved(root: Path) -> str:
    parts = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        done = len(list(folder.glob("*.pt")))
        text = f"{folder.name}: {done} sequence{'s' if done != 1 else ''} finished"
        notes = []
        for path in sorted(folder.glob("batch_in_progress*.json")):  # one per rank
            try:
                note = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(note, dict) and note.get("frames_done"):
                notes.append(note)
        for note in notes:
            text += (f", and a batch of {note.get('sequences')} at frame {note['frames_done']} of "
                     f"{note.get('frames_total')}")
        if done or notes:
            parts.append(text)
    if not parts:
        return ("nothing was saved yet (no sequence or batch state finished saving): running the command again "
                "starts over")
    return (f"saved in {root}: {'; '.join(parts)}. Run the same command again with --resume to continue from there: "
            "only what streamed after the last save (at most --checkpoint-every seconds) is redone")
