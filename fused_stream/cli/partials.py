"""Nothing lost: each sequence's per-position sums are saved the moment its batch completes, and a rerun resumes.

Layout: OUT/partial/<model label>/run.json (what produced them) and one `<hash of name>.pt` per finished sequence
holding its PositionSums, frame count, a hash of its codes and its per-file metrics. Every file is written to a
temporary name and renamed, so a kill at any instant leaves either the old file or the new one, never half of one.

Final metrics are always computed from these per-sequence files, added in data order, whether the run was
interrupted or not: an interrupted-and-resumed run therefore gives bit-identical sums to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..jsonio import atomic_write, to_jsonable
from ..metrics import PositionSums

log = logging.getLogger(__name__)


class ResumeMismatchError(ValueError):
    """--resume found partial results made with other settings."""


def codes_digest(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class PartialStore:
    """The per-sequence results of one model's run under `out/partial/<label>/`."""

    def __init__(self, out: str | Path, label: str, fingerprint: dict[str, Any], *, resume: bool) -> None:
        self.dir = Path(out) / "partial" / _safe(label)
        self.fingerprint = to_jsonable(fingerprint)
        run_file = self.dir / "run.json"
        if resume and run_file.exists():
            saved, now = json.loads(run_file.read_text()), self.fingerprint
            if saved != now:
                changed = ", ".join(sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)))
                raise ResumeMismatchError(
                    f"--resume: the partial results in {self.dir} were made with other settings ({changed}); "
                    "rerun with the same options, or use a new --out"
                )
        elif not resume and self.dir.exists():
            shutil.rmtree(self.dir)  # a fresh run never mixes in an older run's sequences
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_file, (json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n").encode())

    def _path(self, name: str) -> Path:
        return self.dir / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.pt"

    def load(self, name: str, codes: torch.Tensor) -> dict[str, Any] | None:
        """The saved entry of sequence `name` if it exists and was computed on exactly these codes."""
        path = self._path(name)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            log.warning("partial result %s is unreadable (%s): recomputing %s", path, exc, name)
            return None
        if entry.get("name") != name or entry.get("codes_sha256") != codes_digest(codes):
            log.warning("partial result for %s was computed on other codes: recomputing it", name)
            return None
        return entry

    def sums(self, entry: dict[str, Any]) -> PositionSums:
        return PositionSums.from_state_dict(entry["sums"])

    def save(self, name: str, codes: torch.Tensor, sums: PositionSums, metrics: dict[str, Any]) -> None:
        entry = {
            "name": name, "frames": int(codes.shape[-1]), "codes_sha256": codes_digest(codes),
            "sums": sums.state_dict(), "metrics": metrics,
        }
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        atomic_write(self._path(name), buffer.getvalue())


def _safe(label: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return cleaned or "model"
