"""Codes to evaluate as tensors: the `EvalSequence` a run evaluates, random codes, and codes files on disk.

Codes files let a user evaluate tokens made elsewhere (Mimi run once, offline) without audio or Mimi here, so they
accept what such tools write: .pt (a tensor, or a dict holding one tensor or key "codes"), .npy and .safetensors,
[n_codebooks, T] with an optional leading batch of 1, integers or whole floats. Everything else is refused with a
`DataError` naming the file and what is wrong, on one line: a bad file is the user's to fix, not a traceback.
The model's full layout (`EvalSequence`, `generate_codes`) is Moshi's: stream 0 text, streams 1..dep_q the model's
own audio codebooks, the rest the user's audio; laying file codes out so is `core.inputs.layout_codes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel

from ..core.inputs import integer_codes
from ..errors import DataError, one_line
from .librilight import list_files, natural_key

log = logging.getLogger(__name__)

CODES_SUFFIXES = (".pt", ".npy", ".safetensors")


@dataclass
class EvalSequence:
    """One sequence to evaluate: codes [K, T] int64 in the model's full stream layout."""

    name: str  # file path relative to the input root without suffix, "speaker/book", or "generated_i"
    codes: torch.Tensor  # [K, T] int64
    sources: list[str] = field(default_factory=list)  # the files it came from, in order
    index: int = 0  # position in the full, unsharded list: results of several ranks merge back in data order

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


def generate_codes(model: LMModel, n: int, frames: int | list[int], seed: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """Uniformly random tokens: text in [0, text_card), audio in [0, card).

    `frames` an int gives a tensor [n, K, frames]; a list of lengths gives a list of [K, T_i] tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = [frames] * n if isinstance(frames, int) else list(frames)
    if len(lengths) != n:
        raise ValueError(f"got {len(lengths)} lengths for {n} sequences")
    sequences = []
    for T in lengths:
        seq = torch.randint(0, model.card, (model.num_codebooks, T), generator=generator)
        seq[0] = torch.randint(0, model.text_card, (T,), generator=generator)
        sequences.append(seq)
    return torch.stack(sequences) if isinstance(frames, int) else sequences


def load_codes_file(path: str | Path) -> torch.Tensor:
    """Codes [n, T] int64 from a .pt (tensor, or dict with one tensor / key "codes"), .npy or .safetensors file.

    A leading batch dimension of 1 is dropped; float values are accepted only when they are all whole numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"codes file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in CODES_SUFFIXES:
        raise DataError(f"codes file {path}: unsupported format {suffix!r}; use one of {', '.join(CODES_SUFFIXES)}")
    try:
        if suffix == ".pt":
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        else:
            from safetensors.torch import load_file

            obj = load_file(str(path))
    except Exception as exc:  # any reader failure is a bad file from the user's point of view
        raise DataError(f"codes file {path} is unreadable: {one_line(exc)}") from exc
    return _as_codes(_single_tensor(obj, path), path)


def _single_tensor(obj: Any, path: Path) -> torch.Tensor:
    if isinstance(obj, dict):
        if "codes" in obj:
            obj = obj["codes"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise DataError(f"codes file {path} holds keys {sorted(map(str, obj))}: store one tensor or key 'codes'")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iuf":
            raise DataError(f"codes file {path} has dtype {obj.dtype}: codes must be integers")
        if obj.dtype.kind != "f":
            obj = obj.astype(np.int64)
        elif obj.dtype.itemsize > 8:  # long double: torch has none
            obj = obj.astype(np.float64)
        # Floats keep their dtype: float16 codes above 2048 were rounded when written, and `integer_codes` says so.
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"codes file {path} holds a {type(obj).__name__}, not a tensor of codes")
    return obj


def _as_codes(codes: torch.Tensor, path: Path) -> torch.Tensor:
    shape = tuple(codes.shape)
    if codes.dim() == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.dim() != 2 or codes.numel() == 0:
        raise DataError(f"codes file {path} has shape {shape}: expected [n_codebooks, T] (or [1, n_codebooks, T])")
    return integer_codes(codes, f"codes file {path}")  # the API's rules, in `layout_codes`, exactly


def codes_files(path: str | Path) -> list[Path]:
    """A codes file → [it]; a directory → its .pt/.npy/.safetensors files (not recursive), natural order.

    Why not recursive: an output folder inside the data folder (partial results are .pt files, cached codes
    .safetensors) must never be read as data. Codes files in sub-directories (real or symlinked: followed, each
    real directory once) are not read, and a warning lists those sub-directories.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"codes path {path} does not exist")
    found = list_files(path, CODES_SUFFIXES, what="codes")
    files = [p for p in found if p.parent == path]
    nested = sorted({p.relative_to(path).parts[0] for p in found if p.parent != path}, key=natural_key)
    if nested:
        log.warning("codes directory %s: %d codes files in sub-directories are NOT read (a codes directory is not "
                    "recursive; pass each directory): %s", path, len(found) - len(files), ", ".join(nested))
    if not files:
        hint = f" (only in its sub-directories {', '.join(nested)})" if nested else ""
        raise DataError(f"codes directory {path} holds no {'/'.join(CODES_SUFFIXES)} files{hint}")
    return files


def codes_file_frames(path: Path) -> int:
    """T of a codes file from its header (no data read), to balance shards; 0 if that fails.

    A bad file gets 0 rather than an error because the rank that owns it loads it and reports it, in its own mode
    ("raise" or "collect"); an estimate only decides which rank that is.
    """
    try:
        if path.suffix.lower() == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[-1])
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return int(f.get_slice("codes" if "codes" in f.keys() else next(iter(f.keys()))).get_shape()[-1])
        return int(_single_tensor(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path).shape[-1])
    except Exception:  # any failure: the estimate only balances shards
        return 0
