"""`PaperMetricsLibriLight`: the LibriLight long-context evaluation behind a `PaperMetricsEvaluator`-style object.

Training loops written around moshi-finetune's `PaperMetricsEvaluator` build it once with a Mimi and the config,
then call `evaluate_librilight_long_context(model)` every N steps and log each returned key as
`paper_metrics/{key}`. This class keeps that shape: it reads the same config keys, tokenizes the audio with the
given (already loaded) Mimi exactly as the CLI's `--audio` path does (`librilight.audio_files`, `group_chapters`,
`audio.encode_audio_file`), and returns the flat `librilight_*` dict of `api.evaluate_long_context_loss` - the same
numbers `python -m fused_stream.eval --audio DIR --mimi CKPT` writes under `metrics.flat`.

The config (a dict, or an object with attributes: a whole finetune config) is read by the CLI's own reader,
`cli.settings.read_finetune_config`: the same keys as `--config`, with the same meaning and the same `ConfigError`
for a bad value. The keys this evaluator uses: `librilight_audio_dir` (required when enabled; a LibriLight
directory speaker/book/chapter.flac, or one file), `librilight_max_files`, `librilight_concat_chapters`,
`max_sequence_length`, `memory_check`, `enabled` (false -> `{}` without touching anything), every evaluation option
(`librilight_chunk_size`, `librilight_batch_size`, `librilight_window`, or any `EvalConfig` option by name inside a
`librilight_streaming` block), and `ttt_verification` and `cache_clear_interval`, accepted and unused here. Options
only the command line has (models, outputs, ...) are an error in a `librilight_streaming` block; other keys of a
finetune config are ignored.

Every evaluation first checks a prefix of the data against the batch path (`LMModel.forward`) and raises
`core.parity.ParityError` if the model streams differently (e.g. a TTT layer that updates its fast weights only in
`forward`): a training loop learns at its first evaluation that the long-context numbers would be wrong, instead of
logging them. `librilight_streaming: {verify: false}` skips the check; `verify_frames: N` verifies exactly N frames.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from .api import evaluate_long_context_loss
from .cli.settings import EVAL_OPTIONS, ConfigError, Settings, make_settings, read_finetune_config
from .data.audio import encode_audio_file
from .data.librilight import audio_files, group_chapters

__all__ = ["PaperMetricsLibriLight", "mimi_state_hash"]

# What this evaluator does with the reader's values besides the EvalConfig: the rest is the command line's alone.
_USED = {"enabled", "audio", "max_files", "concat_chapters"}
_UNUSED = {"ttt_verification"}  # recorded in the CLI's report; a training loop logs only the metrics


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
        self.config = self.settings.eval  # what `evaluate_long_context_loss` runs with
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        # Hashed once: the weights of a Mimi do not change during finetuning, and hashing them is not free.
        self.mimi_hash = mimi_state_hash(mimi)
        # Codes per (file, frames kept, codebooks): evaluations every N steps reuse them instead of re-encoding.
        self._codes: dict[tuple[str, int | None, int], torch.Tensor] = {}

    def evaluate_librilight_long_context(self, model: LMModel) -> dict[str, float | int]:
        """The flat `librilight_*` metrics of `model` on the configured audio ({} when disabled)."""
        if not self.settings.enabled:
            return {}
        self._check_mimi(model)
        codes = [codes for _, codes in self._sequences(model.dep_q)]
        result = evaluate_long_context_loss(model, codes, self.config)
        return dict(result["metrics"]["flat"])

    def _check_mimi(self, model: LMModel) -> None:
        card, n_q = self.mimi.cardinality, self.mimi.total_codebooks
        if card != model.card or n_q < model.dep_q:
            raise ValueError(f"Mimi has {n_q} codebooks of card {card}; the model expects dep_q={model.dep_q} "
                             f"codebooks of card {model.card}")

    def _sequences(self, dep_q: int) -> list[tuple[str, torch.Tensor]]:
        """(name, codes [dep_q, T]) per sequence, grouped and cut exactly like the CLI's `--audio` path."""
        s, max_frames = self.settings, self.config.max_frames
        root = Path(s.audio)
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
                if max_frames is not None and done >= max_frames:
                    break  # the rest of the book would be cropped away: never encode it
                left = None if max_frames is None else max_frames - done
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


def _read_settings(config: Mapping[str, Any] | Any) -> Settings:
    """The CLI's settings from a finetune config: one reader, one set of defaults, one error type."""
    source = "PaperMetricsLibriLight config"
    values = {} if config is None else read_finetune_config(config, strict=False, source=source)
    cli_only = sorted(set(values) - _USED - _UNUSED - set(EVAL_OPTIONS))
    if cli_only:
        raise ConfigError(f"{source}: {', '.join(cli_only)} only apply to the command line (python -m "
                          "fused_stream.eval); give the Mimi and the model to PaperMetricsLibriLight instead")
    settings = make_settings(values)
    if settings.enabled and settings.audio is None:
        raise ConfigError(f"{source}: librilight_audio_dir is missing: the LibriLight audio directory to evaluate on "
                          "(looked at the top level, in paper_metrics and in librilight_streaming)")
    return settings


def _relative_stem(file: Path, base: Path) -> str:
    """The CLI's sequence name of a file: its path relative to the audio root, without suffix."""
    try:
        rel = file.relative_to(base)
    except ValueError:
        rel = Path(file.name)
    return (rel if rel.parts else Path(file.name)).with_suffix("").as_posix()
