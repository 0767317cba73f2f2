"""Reading a config: a fused_stream config (options by name) or a moshi-finetune training config (its paper_metrics).

Two kinds of file reach `--config` and `PaperMetricsEvaluator(config=...)`:

- a **moshi-finetune training config**: it has any of moshi-finetune's own top-level keys (`TRAINING_KEYS`:
  `data`, `run_dir`, `lora`, `optim`, ...). Only its `paper_metrics` block is read
  (and the `librilight_streaming` block inside it); its top-level keys are the training's, and a training key never
  becomes an evaluation setting (its `batch_size: 16` is the training's batch). The log says which keys were read.
  A mapping without such keys handed to `PaperMetricsEvaluator` is taken as the block itself, the way a training
  loop passes `args.paper_metrics`;
- a **fused_stream config**: options by name (`chunk_size` or `chunk-size`) at the top level, the keys of the
  block below, a `librilight_streaming` block, and a `paper_metrics` block read like a training config's; an
  unknown top-level key is an error.

In the block, every key moshi-finetune's paper-metrics code reads has a stated meaning here:
- `CLIENT_KEYS`: honoured, with the option each sets (the client's meaning; `data.selection` for the book modes);
- `NOTED_KEYS`: accepted, and why nothing is set (logged once);
- `use_fixed_method: false` is refused: it asked for the legacy separate-forward-pass loss, which this package does
  not compute (it disagreed with the streamed model);
- the keys of the other paper-metrics benchmarks (`OTHER_BENCHMARKS` prefixes) are not read here: this evaluator
  computes the LibriLight keys only (logged once);
- an unknown `librilight_*` key is an error (a typo would silently evaluate other data); any other unknown key of
  the block is logged as not read. In a `librilight_streaming` block every unknown key is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..core.config import ConfigError

__all__ = ["CLIENT_KEYS", "NOTED_KEYS", "TRAINING_KEYS", "read_config_values"]

log = logging.getLogger(__name__)

BLOCK, STREAMING = "paper_metrics", "librilight_streaming"

# A paper-metrics key -> the option it sets, with the client's meaning.
CLIENT_KEYS = {
    "enabled": "enabled",
    "memory_check": "memory_check",
    "max_sequence_length": "max_frames",
    "librilight_audio_dir": "audio",
    "librilight_concatenated_dir": "concatenated_dir",  # the audio of mode pre_concatenated
    "librilight_max_files": "max_files",
    "librilight_concat_chapters": "concat_chapters",
    "librilight_chunk_size": "chunk_size",
    "librilight_batch_size": "batch_size",
    "librilight_window": "window",
    "librilight_evaluation_mode": "book_mode",
    "librilight_speaker_id": "speaker",
    "librilight_book_name": "book",
    "librilight_max_chapters": "max_chapters",
    "librilight_num_sequences": "num_books",
    "first_codebook_weight_multiplier": "first_codebook_weight",
    "verify_loss_computation": "verify",
    "ttt_verification": "ttt_verification",
}

# Accepted keys that set nothing, and why.
NOTED_KEYS = {
    "cache_clear_interval": "streaming memory is constant by construction: there is no cache to clear",
    "memory_log_interval": "memory is sampled by a background thread (EvalConfig.monitor_interval seconds) and "
                           "reported once, in the report's memory section",
    "use_fixed_method": "the exact streamed loss is the only method",
    "paper_metrics_eval": "whether to evaluate at all is the training loop's to decide",
    "paper_metrics_freq": "how often to evaluate is the training loop's to decide",
    "paper_metrics_use_silence": "it configures the short benchmarks; the LibriLight loss never read it",
    "paper_metrics_use_user_stream": "it configures the short benchmarks; the LibriLight loss never read it "
                                     "(--other-fill sets the user's stream here)",
}
OTHER_BENCHMARKS = ("sblimp_", "swuggy_", "sstory_", "tstory_")

# moshi-finetune's top-level training keys: any of them makes a file a training config. Not `batch_size`, `seed`
# or `ttt`, which a fused_stream config may also hold (a training config always has some of these besides).
TRAINING_KEYS = frozenset({
    "data", "run_dir", "moshi_paths", "lora", "full_finetuning", "optim", "max_steps", "duration_sec",
    "num_microbatches", "seq_len", "gradient_checkpointing", "text_padding_weight", "wandb", "save_adapters",
    "do_ckpt", "ckpt_freq", "do_eval", "eval_freq", "log_freq", "param_dtype", "overwrite_run_dir",
})

CheckFn = Callable[[str, Any], Any]


def is_training_config(config: Any) -> bool:
    """moshi-finetune's top-level keys are there (a `paper_metrics` block alone may sit in a fused_stream config)."""
    return bool(set(_keys(config)) & TRAINING_KEYS)


def read_config_values(config: Any, *, fused_stream_file: bool, source: str, check: CheckFn,
                       options: set[str]) -> dict[str, Any]:
    """Checked option values from `config` (a mapping or an object with attributes).

    `fused_stream_file`: `config` is a `--config` file, read as a fused_stream config unless it is a training
    config; otherwise (`PaperMetricsEvaluator`) it is a training config or the block itself. `check(name, value)`
    checks one option; `options` are the names a fused_stream config may set."""
    training = is_training_config(config)
    if training:
        block = _get(config, BLOCK)
        if block is None:
            raise ConfigError(f"{source}: a moshi-finetune training config without a {BLOCK} block: nothing to "
                              "evaluate (a fused_stream config gives options by name and no training keys)")
        levels = [(block, f"{BLOCK}.", "block")]
    else:  # a fused_stream config (strict), or the block itself handed to the drop-in; either may hold a block
        levels = [(config, "", "strict" if fused_stream_file else "block")]
        if _get(config, BLOCK) is not None:
            levels.append((_get(config, BLOCK), f"{BLOCK}.", "block"))
    for parent, prefix, _ in list(levels):
        sub = _get(parent, STREAMING)
        if sub is not None:
            levels.append((sub, f"{prefix}{STREAMING}.", "strict"))
    values: dict[str, Any] = {}
    read, noted, other = [], [], []
    for obj, prefix, mode in levels:  # the librilight_streaming block last: the more specific level wins
        level: dict[str, Any] = {}
        for key, name, value in _level(obj, prefix, mode, source, options, noted, other):
            if name in level:
                raise ConfigError(f"{source}: {prefix}{key} sets {name} a second time")
            try:
                level[name] = check("audio" if name == "concatenated_dir" else name, value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {prefix}{key}: {exc}") from None
            read.append(prefix + key)
        values.update(level)
    _resolve_concatenated(values, source)
    if training or not fused_stream_file:
        log.info("%s: read %s", source, ", ".join(read) or "no key")
        for key, why in noted:
            log.info("%s: %s accepted, sets nothing: %s", source, key, why)
        if other:
            log.info("%s: not read here (this evaluator computes the LibriLight loss only): %s", source,
                     ", ".join(other))
    return values


def _level(obj: Any, prefix: str, mode: str, source: str, options: set[str], noted: list, other: list):
    """(key, option name, value) of every key of one level that sets an option; the rest noted, listed or refused."""
    if obj is not None and not isinstance(obj, Mapping) and isinstance(obj, (str, bytes, int, float, list)):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {obj!r}")
    for key in _keys(obj):
        value = _get(obj, key)
        if key in (BLOCK, STREAMING):
            continue  # a block of its own, read as a level
        if key == "use_fixed_method" and value is False:
            raise ConfigError(f"{source}: {prefix}use_fixed_method: false asks for the legacy separate-forward-pass "
                              "loss, which fused_stream does not compute (it disagreed with the streamed model); "
                              "remove the key")
        if key in NOTED_KEYS:
            noted.append((prefix + key, NOTED_KEYS[key]))
            continue
        name = CLIENT_KEYS.get(key) or (key.replace("-", "_") if mode == "strict" else None)
        if name is None or (key not in CLIENT_KEYS and name not in options):
            if mode == "strict":
                raise ConfigError(f"{source}: unknown key {prefix + key!r}")
            if key.startswith("librilight_"):
                raise ConfigError(f"{source}: unknown key {prefix + key!r}: a LibriLight key this evaluator does not "
                                  f"know would silently evaluate other data (known: "
                                  f"{', '.join(k for k in CLIENT_KEYS if k.startswith('librilight_'))})")
            other.append(prefix + key)
            continue
        if value is not None:
            yield key, name, value


def _resolve_concatenated(values: dict[str, Any], source: str) -> None:
    """`librilight_concatenated_dir` is the audio of mode pre_concatenated (and only of it)."""
    folder = values.pop("concatenated_dir", None)
    if folder is None:
        return
    if values.get("book_mode") != "pre_concatenated":
        log.info("%s: librilight_concatenated_dir is read by librilight_evaluation_mode pre_concatenated only",
                 source)
        return
    values["audio"] = folder


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _keys(obj: Any) -> list[str]:
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [str(k) for k in obj]
    if hasattr(obj, "__dict__"):
        return list(vars(obj))
    return [k for k in (*CLIENT_KEYS, BLOCK, STREAMING) if hasattr(obj, k)]
