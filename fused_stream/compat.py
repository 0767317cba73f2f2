"""The LibriLight long-context evaluation behind moshi-finetune's paper-metrics interface.

Training loops written around moshi-finetune's `PaperMetricsEvaluator` build it once and call it every N steps:

    evaluator = PaperMetricsEvaluator(mimi, interleaved_tokenizer, config=args.paper_metrics)
    for key, value in evaluator.evaluate_all(model).items():
        log(f"paper_metrics/{key}", value)

`PaperMetricsEvaluator` keeps those names (and `evaluate_librilight_long_context`, `evaluate_librilight_only`);
`PaperMetricsLibriLight(mimi, config)` is the same evaluator without the tokenizer argument. It tokenizes the audio
with the given (already loaded) Mimi exactly as the CLI's `--audio` path does and returns the flat `librilight_*`
dict of `api.evaluate_long_context_loss`: the numbers `python -m fused_stream.eval --audio DIR --mimi CKPT --config
TRAIN.yaml` writes under `metrics.flat`. It computes the LibriLight keys only (it says so once), never the short
benchmarks (sBLIMP, sWUGGY, ...) of the legacy evaluator.

The config is read by the CLI's own reader (`options.finetune_config`): a whole training config (mapping or object:
only its `paper_metrics` block is read) or the block itself, every key with the legacy meaning or refused by name,
the same `ConfigError` for a bad value. The data: `librilight_audio_dir`, or the books `librilight_evaluation_mode`
names (`data.selection`: single_book, multi_book, pre_concatenated); `PaperMetricsEvaluator` without a mode
evaluates legacy code's default book (single_book: speaker 100, Emerald City, 3 chapters), never a whole split.
`memory_check` warns when memory grew (legacy meaning); `first_codebook_weight_multiplier` (or the constructor's
argument) weights codebook 0 in the flat keys, as training weighs it.

Every evaluation first checks a prefix of the data against the batch path (`LMModel.forward`) and raises
`verify.parity.ParityError` if the model streams differently (e.g. a TTT layer that updates its fast weights only in
`forward`), and hands the model back exactly as it came either way. With a process group initialised every rank
must call; each encodes and evaluates its share of the books, and all get the same metrics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from .api import check_config, evaluate_share, prepare_codes, unwrap_model
from .data.audio import encode_audio_file
from .data.dataset import assign_shards
from .data.librilight import audio_files, group_chapters, relative_name
from .data.selection import CLIENT_DEFAULTS
from .distributed import current_world
from .measure.monitor import warn_memory_growth
from .options.settings import EVAL_OPTIONS, ConfigError, Settings, make_settings, read_finetune_config

__all__ = ["PaperMetricsEvaluator", "PaperMetricsLibriLight", "mimi_state_hash"]

log = logging.getLogger(__name__)

# What this evaluator does with the reader's values besides the EvalConfig: the rest is the command line's alone.
_USED = {"enabled", "audio", "max_files", "concat_chapters", "memory_check", "book_mode", "speaker", "book",
         "max_chapters", "num_books"}
_UNUSED = {"ttt_verification"}  # recorded in the CLI's report; a training loop logs only the metrics


class PaperMetricsLibriLight:
    """LibriLight long-context loss for a training loop: build once, call every evaluation step.

    >>> evaluator = PaperMetricsLibriLight(mimi, config, cache_dir="cache/")
    >>> for key, value in evaluator.evaluate_librilight_long_context(model).items():
    ...     log(f"paper_metrics/{key}", value)
    """

    def __init__(self, mimi: MimiModel, config: Mapping[str, Any] | Any, *,
                 cache_dir: str | Path | None = None, first_codebook_weight_multiplier: float | None = None) -> None:
        self.mimi = mimi
        self.settings = _read_settings(config)
        if first_codebook_weight_multiplier is not None:  # the training's weighting, handed over by the loop
            self.settings.eval = replace(self.settings.eval, codebook_weights=None,
                                         first_codebook_weight=float(first_codebook_weight_multiplier))
        self.config = self.settings.eval  # what `evaluate_long_context_loss` runs with
        self._announced = False
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        # Hashed once: the weights of a Mimi do not change during finetuning, and hashing them is not free.
        self.mimi_hash = mimi_state_hash(mimi)
        # Codes per (file, frames kept, codebooks): evaluations every N steps reuse them instead of re-encoding.
        self._codes: dict[tuple[str, int | None, int], torch.Tensor] = {}

    def evaluate_librilight_long_context(self, model: LMModel | torch.nn.Module) -> dict[str, float | int]:
        """The flat `librilight_*` metrics of `model` on the configured audio ({} when disabled)."""
        if not self.settings.enabled:
            if not self._announced:
                log.warning("LibriLight evaluation disabled by the config's enabled: false: nothing is evaluated")
                self._announced = True
            return {}
        model = unwrap_model(model)
        self._check_mimi(model)
        world = current_world()
        groups = self._groups()
        mine = assign_shards([sum(f.stat().st_size for f in files) for _, files in groups],
                             [name for name, _ in groups], world.size)[world.rank]  # sizes: lengths before encoding
        if not self._announced:
            selection = self.settings.selection()
            log.info("LibriLight long-context loss (the only metric computed here) on %d sequence(s) from %s: %s",
                     len(groups), self.settings.audio, selection.describe() if selection else (
                         "every book" if self.settings.concat_chapters else "every file"))
            self._announced = True
        codes = [self._codes_of(groups[i][1], model.dep_q) for i in mine]  # this rank's books only are encoded
        config = check_config(model, self.config, {})
        result = evaluate_share(model, prepare_codes(model, codes, config) if codes else [], config, world,
                                indices=mine)
        warn_memory_growth(result["report"], type(model).__name__, self.settings.memory_check)
        return dict(result["metrics"]["flat"])

    def _check_mimi(self, model: LMModel) -> None:
        card, n_q = self.mimi.cardinality, self.mimi.total_codebooks
        if card != model.card or n_q < model.dep_q:
            raise ValueError(f"Mimi has {n_q} codebooks of card {card}; the model expects dep_q={model.dep_q} "
                             f"codebooks of card {model.card}")

    def _groups(self) -> list[tuple[str, list[Path]]]:
        """(name, files) per sequence, grouped and selected exactly like the CLI's `--audio` path."""
        s = self.settings
        root = Path(s.audio)
        files = audio_files(root)
        base = root if root.is_dir() else root.parent
        selection = s.selection()
        if selection is not None:
            groups = selection.groups(files, base)
        elif s.concat_chapters:
            groups = group_chapters(files, base)
        else:
            groups = [(relative_name(f, base), [f]) for f in files]
        return groups[: s.max_files]

    def _codes_of(self, chapters: list[Path], dep_q: int) -> torch.Tensor:
        """codes [dep_q, T] of one sequence, its chapters joined and cut like the CLI's."""
        max_frames = self.config.max_frames
        parts: list[torch.Tensor] = []
        done = 0
        for chapter in chapters:
            if max_frames is not None and done >= max_frames:
                break  # the rest of the book would be cropped away: never encode it
            left = None if max_frames is None else max_frames - done
            parts.append(self._encode(chapter, left, dep_q))
            done += parts[-1].shape[1]
        return torch.cat(parts, dim=1)

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


class PaperMetricsEvaluator(PaperMetricsLibriLight):
    """moshi-finetune's `PaperMetricsEvaluator` interface: adopting it is a one-line import change in train.py.

    `interleaved_tokenizer` and `device` are accepted for the call's shape and unused (the codes come from the Mimi;
    the model runs where it is). `evaluate_all(model)` returns the LibriLight keys only; the short benchmarks of
    the legacy evaluator are not computed (said once, at construction). Without `librilight_evaluation_mode` the
    legacy default book is evaluated (single_book, speaker 100, Emerald City, 3 chapters), as legacy code did.
    """

    def __init__(self, mimi_encoder: MimiModel, interleaved_tokenizer: Any = None, device: str | None = None,
                 config: Mapping[str, Any] | Any = None, *, cache_dir: str | Path | None = None,
                 first_codebook_weight_multiplier: float | None = None) -> None:
        super().__init__(mimi_encoder, config, cache_dir=cache_dir,
                         first_codebook_weight_multiplier=first_codebook_weight_multiplier)
        s = self.settings
        if s.enabled and s.book_mode is None and not s.concat_chapters and s.max_files is None:
            s.book_mode = CLIENT_DEFAULTS["mode"]  # the legacy default: one book, not every file of a split
            s.selection()
        log.info("PaperMetricsEvaluator (fused_stream): evaluate_all computes the LibriLight long-context keys only "
                 "(no sBLIMP, sWUGGY, sStoryCloze, tStoryCloze)")

    def evaluate_all(self, model: LMModel | torch.nn.Module) -> dict[str, float | int]:
        return self.evaluate_librilight_long_context(model)

    def evaluate_librilight_only(self, model: LMModel | torch.nn.Module) -> dict[str, float | int]:
        return self.evaluate_librilight_long_context(model)


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
    if settings.book_mode is not None:
        settings.selection()  # a mode without what it needs: refused now, not at the first evaluation
    if settings.enabled and settings.audio is None:
        raise ConfigError(f"{source}: librilight_audio_dir is missing: the LibriLight audio directory to evaluate on "
                          "(looked at the top level, in paper_metrics and in librilight_streaming)")
    return settings
