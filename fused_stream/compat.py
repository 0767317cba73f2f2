"""`PaperMetricsLibriLight`: the LibriLight long-context evaluation behind a `PaperMetricsEvaluator`-style object.

Training loops written around moshi-finetune's `PaperMetricsEvaluator` build it once with a Mimi and the config,
then call `evaluate_librilight_long_context(model)` every N steps and log each returned key as
`paper_metrics/{key}`. This class keeps that shape: it reads the same config keys, tokenizes the audio with the
given (already loaded) Mimi exactly as the CLI's `--audio` path does (`data.audio_files`, `data.group_chapters`,
`audio.encode_audio_file`), and returns the flat `librilight_*` dict of `api.evaluate_long_context_loss` - the same
numbers `python -m fused_stream.eval --audio DIR --mimi CKPT` writes under `metrics.flat`.

Config keys (a dict or an object with attributes; at the top level or in a nested `paper_metrics` block):
- `librilight_audio_dir` (required when enabled): a LibriLight directory (speaker/book/chapter.flac) or one file;
- `librilight_max_files`: the first N sequences (files, or books with concatenation);
- `max_sequence_length`: crop every sequence to N frames (also read from the `librilight_streaming` sub-block,
  where legacy configs keep it; the sub-block wins);
- `enabled` (in `librilight_streaming`, or at the block's top level): False -> `{}` without touching anything;
- `librilight_concat_chapters` (default False), `librilight_chunk_size` (default 1), `librilight_batch_size`
  (default "auto");
- `librilight_window` (default 1000, the CLI's `--window`): an extension, for eval sets too short for 1000-frame
  windows.
A key set to None counts as absent. Other keys are ignored: a finetune config holds many unrelated ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from .api import evaluate_long_context_loss
from .data.audio import encode_audio_file
from .data.dataset import audio_files, group_chapters
from .errors import DataError

__all__ = ["PaperMetricsLibriLight", "mimi_state_hash"]

_MISSING = object()
_BLOCK, _STREAMING = "paper_metrics", "librilight_streaming"


@dataclass(frozen=True)
class _LibriLightSettings:
    enabled: bool
    audio_dir: Path | None
    max_files: int | None
    max_frames: int | None
    concat_chapters: bool
    chunk_size: int
    batch_size: int | str | None
    window: int


class PaperMetricsLibriLight:
    """LibriLight long-context loss for a training loop: build once, call every evaluation step.

    >>> evaluator = PaperMetricsLibriLight(mimi, config, cache_dir="cache/")
    >>> for key, value in evaluator.evaluate_librilight_long_context(model).items():
    ...     log(f"paper_metrics/{key}", value)
    """

    def __init__(self, mimi: MimiModel, config: Mapping[str, Any] | Any, *,
                 cache_dir: str | Path | None = None) -> None:
        self.mimi = mimi
        self.settings = _read_settings(config)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        # Hashed once: the weights of a Mimi do not change during finetuning, and hashing them is not free.
        self.mimi_hash = mimi_state_hash(mimi)
        # Codes per (file, frames kept, codebooks): evaluations every N steps reuse them instead of re-encoding.
        self._codes: dict[tuple[str, int | None, int], torch.Tensor] = {}

    def evaluate_librilight_long_context(self, model: LMModel) -> dict[str, float | int]:
        """The flat `librilight_*` metrics of `model` on the configured audio ({} when disabled)."""
        s = self.settings
        if not s.enabled:
            return {}
        self._check_mimi(model)
        codes = [codes for _, codes in self._sequences(model.dep_q)]
        result = evaluate_long_context_loss(
            model, codes, chunk_size=s.chunk_size, batch_size=s.batch_size, max_frames=s.max_frames,
            window=s.window,
        )
        return dict(result["metrics"]["flat"])

    def _check_mimi(self, model: LMModel) -> None:
        card, n_q = self.mimi.cardinality, self.mimi.total_codebooks
        if card != model.card or n_q < model.dep_q:
            raise ValueError(f"Mimi has {n_q} codebooks of card {card}; the model expects dep_q={model.dep_q} "
                             f"codebooks of card {model.card}")

    def _sequences(self, dep_q: int) -> list[tuple[str, torch.Tensor]]:
        """(name, codes [dep_q, T]) per sequence, grouped and cut exactly like the CLI's `--audio` path."""
        s = self.settings
        root = s.audio_dir
        files = audio_files(root)
        base = root if root.is_dir() else root.parent
        if s.concat_chapters:
            groups = group_chapters(files, base)
        else:
            groups = [(_relative_stem(f, base), [f]) for f in files]
        out = []
        for name, chapters in groups[: s.max_files]:
            parts: list[torch.Tensor] = []
            done = 0
            for chapter in chapters:
                if s.max_frames is not None and done >= s.max_frames:
                    break  # the rest of the book would be cropped away: never encode it
                left = None if s.max_frames is None else s.max_frames - done
                parts.append(self._encode(chapter, left, dep_q))
                done += parts[-1].shape[1]
            out.append((name, torch.cat(parts, dim=1)))
        return out

    def _encode(self, path: Path, max_frames: int | None, dep_q: int) -> torch.Tensor:
        key = (str(path.resolve()), max_frames, dep_q)
        codes = self._codes.get(key)
        if codes is None:
            codes = encode_audio_file(self.mimi, path, num_codebooks=dep_q, mimi_hash=self.mimi_hash,
                                      cache_dir=self.cache_dir, max_frames=max_frames)
            self._codes[key] = codes
        return codes


def mimi_state_hash(mimi: torch.nn.Module) -> str:
    """Hex sha256 of a Mimi's state_dict (names, dtypes, shapes, bytes) and framing: the codes cache key's Mimi part.

    Why not the checkpoint file's hash like the CLI: a training loop holds a loaded Mimi, not its file.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(mimi.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, bf16 included
    for attr in ("sample_rate", "frame_rate", "cardinality", "total_codebooks", "channels"):
        digest.update(f"{attr}={getattr(mimi, attr, None)}|".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- config


def _get(obj: Any, key: str) -> Any:
    """obj[key] for a mapping, obj.key otherwise; _MISSING when absent or None (None means "not set")."""
    if obj is None or obj is _MISSING:
        return _MISSING
    value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else getattr(obj, key, _MISSING)
    return _MISSING if value is None else value


def _read_settings(config: Mapping[str, Any] | Any) -> _LibriLightSettings:
    if config is None:
        raise DataError("PaperMetricsLibriLight needs a config with librilight_audio_dir")
    blocks = [b for b in (_get(config, _BLOCK), config) if b is not _MISSING]  # the nested block first
    streaming = [s for s in (_get(b, _STREAMING) for b in blocks) if s is not _MISSING]

    def value(key: str, default: Any = None, *, in_streaming: bool = False) -> Any:
        for source in [*(streaming if in_streaming else []), *blocks]:
            found = _get(source, key)
            if found is not _MISSING:
                return found
        return default

    enabled = value("enabled", True, in_streaming=True)
    if not isinstance(enabled, bool):
        raise DataError(f"config key enabled must be true or false, got {enabled!r}")
    audio_dir = value("librilight_audio_dir")
    if enabled and audio_dir is None:
        raise DataError("config key librilight_audio_dir is missing: the LibriLight audio directory to evaluate on "
                        f"(looked at the top level and in {_BLOCK})")
    settings = _LibriLightSettings(
        enabled=enabled,
        audio_dir=None if audio_dir is None else Path(audio_dir),
        max_files=_positive("librilight_max_files", value("librilight_max_files")),
        max_frames=_positive("max_sequence_length", value("max_sequence_length", in_streaming=True)),
        concat_chapters=bool(value("librilight_concat_chapters", False)),
        chunk_size=_positive("librilight_chunk_size", value("librilight_chunk_size", 1)),
        batch_size=_batch_size(value("librilight_batch_size", "auto")),
        window=_positive("librilight_window", value("librilight_window", 1000)),
    )
    return settings


def _positive(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"config key {key} must be an int >= 1, got {value!r}")
    return value


def _batch_size(value: Any) -> int | str | None:
    if value == "auto":
        return value
    if isinstance(value, str) and value.lower() == "none":  # YAML may spell "all at once" as a string
        return None
    return _positive("librilight_batch_size", value)


def _relative_stem(file: Path, base: Path) -> str:
    """The CLI's sequence name of a file: its path relative to the audio root, without suffix."""
    try:
        rel = file.relative_to(base)
    except ValueError:
        rel = Path(file.name)
    return (rel if rel.parts else Path(file.name)).with_suffix("").as_posix()
