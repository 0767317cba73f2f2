"""The settings of one evaluation run: `EvalConfig`'s defaults < a YAML config file < the command line.

`Settings` holds an `EvalConfig` (every evaluation option, its default and its allowed values live there) and only
the options of the command-line tool itself: models, data source, output, resume. Values from any source go through
`check_option`, so a config file and the command line accept the same values and fail with the same `ConfigError`.

A config file is a fused_stream config (options by name) or a moshi-finetune training config, of which only the
`paper_metrics` block is read: `options/finetune_config.py` tells them apart and holds every key of that block with its
meaning. `read_finetune_config` is the one reader, used by `--config` and by `compat`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from moshi.models.loaders import DEFAULT_REPO

from ..core.config import ConfigError, EvalConfig
from ..data.checkpoints import HubCheckpoint, is_hub_spec
from ..data.models import MOSHI_FLAGS, model_source
from ..data.selection import CLIENT_DEFAULTS, MODES, BookSelection
from ..data.sources import SOURCES
from ..errors import DataError
from ..stats.analysis import DEFAULT_B, DEFAULT_SEED
from ..stats.units import CLUSTERS
from ..version import __version__
from .finetune_config import read_config_values

__all__ = [
    "DEMO_SEQUENCES", "EVAL_OPTIONS", "ConfigError", "Settings", "SettingsError", "check_option", "make_settings",
    "model_label", "model_spec", "parse_ttt", "read_config", "read_finetune_config", "resolve",
]

DEMO_SEQUENCES = 4  # the embedded default: 4 generated sequences of 200 frames on `tiny`

SettingsError = ConfigError  # the name this module's errors had before EvalConfig's error covered every source

# The evaluation options the command line exposes, by name: argparse flags and config keys are built from these.
EVAL_OPTIONS: dict[str, Field] = {f.name: f for f in fields(EvalConfig) if f.metadata["cli"]}


@dataclass
class Settings:
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: list[str] = field(default_factory=lambda: ["tiny"])
    ttt: list[str] = field(default_factory=list)  # "LABEL:layers=2,3,mb=16[,lr=1.0,alpha=0.1]": attach TTT to LABEL
    device: str = "auto"  # where the CLI loads each model (auto: cuda if available)
    dtype: str = "auto"  # the dtype it loads it in (auto: bfloat16 on CUDA, float32 on CPU)
    codes: str | None = None
    audio: str | None = None
    mimi: str | None = None
    generate: int | None = None  # None: DEMO_SEQUENCES when no --codes / --audio is given
    frames: int = 200
    max_files: int | None = None
    concat_chapters: bool = False
    allow_duplicates: bool = False  # evaluate files of identical content under several paths each time
    cache_dir: str | None = None
    min_frames: int = 1
    seed: int = 0
    out: str = "fused_stream_out"
    resume: bool = False
    keep_going: bool = False
    ttt_verification: bool = False
    enabled: bool = True
    memory_check: bool = False  # warn (not fail) when memory grows with frames: paper-metrics configs' memory_check
    # paper-metrics book selection (data.selection): librilight_evaluation_mode and its keys
    book_mode: str | None = None
    speaker: str | None = None
    book: str | None = None
    max_chapters: int | None = None
    num_books: int | None = None
    progress: bool = True
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose, 2 debug
    threads: int | None = None  # torch's CPU threads; None: the CPUs this process may use (affinity, cgroup quota)
    config: str | None = None
    cluster: str | None = None  # the bootstrap's unit: file, book, speaker (None: book where the data names books)
    bootstrap: int = DEFAULT_B  # resamples of the cluster bootstrap (0: no error bars, no comparisons)
    bootstrap_seed: int = DEFAULT_SEED  # seed of the resample matrix, recorded in the signature
    baseline: str | None = None  # the model the others are compared with (None: the first)

    @property
    def synthetic(self) -> bool:
        return self.codes is None and self.audio is None

    def selection(self) -> BookSelection | None:
        """The books a paper-metrics config names (None: every file, or every book with concat_chapters)."""
        if self.book_mode is None:
            return None
        given = {"speaker": self.speaker, "book": self.book, "max_chapters": self.max_chapters,
                 "num_books": self.num_books}
        options = {k: CLIENT_DEFAULTS[k] if v is None else v for k, v in given.items()}
        try:
            return BookSelection(self.book_mode, **options, seed=self.seed)
        except DataError as exc:
            raise ConfigError(str(exc)) from None

    def as_dict(self) -> dict[str, Any]:
        """One flat mapping of every option the command line can set, as results.json records it."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eval"}
        return {name: getattr(self.eval, name) for name in EVAL_OPTIONS} | own

    def fingerprint(self, model: str) -> dict[str, Any]:
        """The options that decide the losses of `--model` entry `model` ([LABEL=]SPEC): a resumed run must match
        them (batch size, threads, output do not). The CLI adds the content fingerprints of the model and Mimi files
        and the resolved dtype, device type and loss backend (`cli.checks`)."""
        label = model_label(model)
        own = ("codes", "audio", "mimi", "generate", "frames", "max_files", "min_frames", "concat_chapters", "dtype",
               "seed", "book_mode", "speaker", "book", "max_chapters", "num_books")
        evaluation = ("max_frames", "text_fill", "other_fill", "chunk_size", "invalid_tokens", "loss_backend")
        ttt = [options for entry_label, options in map(parse_ttt, self.ttt) if entry_label == label]
        return ({"model": model_spec(model), "ttt": ttt, "fused_stream": __version__}
                | {k: getattr(self, k) for k in own} | {k: getattr(self.eval, k) for k in evaluation})


_OWN = {f.name: f for f in fields(Settings) if f.name != "eval"}
_COUNTS = ("generate", "frames", "max_files", "min_frames", "threads", "max_chapters", "num_books")
# Options a config file may set by name: all but how the tool itself runs this time.
_FILE_OPTIONS = (set(_OWN) | set(EVAL_OPTIONS)) - {"config", "verbosity", "progress"}

def check_option(name: str, value: Any) -> Any:
    """`value` as the run holds option `name` (a string from a file parsed like the command line's); ConfigError
    naming the option when it is not allowed."""
    if name in EVAL_OPTIONS:
        parse = EVAL_OPTIONS[name].metadata["parse"]
        if parse is not None and isinstance(value, str):
            try:
                value = parse(value)
            except ConfigError:
                raise
            except ValueError:  # int("x") names neither the option nor what it wants
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if EVAL_OPTIONS[name].type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        EvalConfig(**{name: value})  # its own validation, on this one option
        return value
    if name not in _OWN:
        raise ConfigError(f"unknown option {name!r}")
    kind = str(_OWN[name].type)
    if name in ("model", "ttt"):
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{name} must be a string or a list of strings, got {value!r}")
    elif name == "dtype" and value != "auto":
        EvalConfig(dtype=value)
    elif kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif kind.startswith("int"):
        low = 1 if name in _COUNTS else None
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"{name} must be an integer{' >= 1' if low else ''}, got {value!r}")
    elif kind.startswith("str"):
        if name in ("speaker", "book") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads a speaker id of digits as a number
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        value = os.fspath(value)
        if name == "book_mode" and value not in MODES:
            raise ConfigError(f"librilight_evaluation_mode {value!r} is not one of {', '.join(MODES)}; legacy code "
                              "drew a new random book at every other value, so its logged numbers came from "
                              "different books at every evaluation")
    return value


def make_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from checked option values; every option not given keeps its one default."""
    evaluation = {k: v for k, v in values.items() if k in EVAL_OPTIONS}
    return Settings(eval=EvalConfig(**evaluation), **{k: v for k, v in values.items() if k not in EVAL_OPTIONS})


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults, then the `--config` file, then every option given on the command line (None = not given)."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_config(args.config))
    given = {name: value for name, value in vars(args).items() if value is not None}
    hub = {name: given.pop(name) for name in MOSHI_FLAGS if name in given}
    if hub:
        values["model"] = [hub_flags_entry(hub, "model" in values or "model" in given)]
    for name, value in given.items():
        try:
            values[name] = check_option(name, value)
        except ConfigError as exc:
            raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    settings = make_settings(values)
    validate(settings)
    return settings


def read_config(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML file (see the module docstring for the accepted keys)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, got {type(raw).__name__}")
    return read_finetune_config(raw, strict=True, source=f"config file {path}")


def read_finetune_config(config: Mapping[str, Any] | Any, *, strict: bool, source: str) -> dict[str, Any]:
    """Checked option values from a config (a mapping, or an object with attributes); `options.finetune_config` says
    how. `strict`: `config` is a `--config` file (a fused_stream config unless it is a training config)."""
    return read_config_values(config, fused_stream_file=strict, source=source, check=check_option,
                              options=_FILE_OPTIONS)


def validate(s: Settings) -> None:
    """What no single option can check: the data source, and models, TTT and labels that go together."""
    given = [name for name in SOURCES if getattr(s, name, None) is not None]  # the registered sources' flags
    if len(given) > 1:
        raise ConfigError(f"give one data source: {', '.join('--' + name for name in SOURCES)}")
    if not s.model:
        raise ConfigError("--model needs at least one preset or checkpoint")
    if s.enabled and s.audio is not None and s.mimi is None and not is_hub_spec(model_spec(s.model[0])):
        raise ConfigError(f"--audio {s.audio} needs a Mimi to tokenize the audio: --mimi PATH, or a first model from "
                          "a Hugging Face checkpoint (--model hf:ORG/NAME, --hf-repo), whose Mimi is used")
    if s.book_mode is not None:
        if s.audio is None:
            raise ConfigError(f"librilight_evaluation_mode {s.book_mode} selects LibriLight books: it needs the audio "
                              "(librilight_audio_dir, or --audio)")
        s.selection()
    try:
        labels = [model_label(spec) for spec in s.model]
    except ValueError as exc:  # an hf: spec that does not parse
        raise ConfigError(f"--model: {exc}") from None
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two --model entries share a label ({', '.join(labels)}): name them LABEL=SPEC")
    if s.cluster is not None and s.cluster not in CLUSTERS:
        raise ConfigError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {s.cluster!r}")
    if s.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0: no error bars), got {s.bootstrap}")
    if s.baseline is not None and s.baseline not in labels:
        raise ConfigError(f"--baseline {s.baseline!r} is not a --model label (labels: {', '.join(labels)})")
    for entry in s.ttt:
        label = parse_ttt(entry)[0]
        if label not in labels:
            raise ConfigError(f"--ttt {entry!r}: no --model is labelled {label!r} (labels: {', '.join(labels)})")


def parse_ttt(entry: str) -> tuple[str, dict[str, Any]]:
    """`ttt:layers=2,3,mb=16,lr=1.0,alpha=0.1` -> ("ttt", {"layers": [2, 3], "mini_batch": 16, ...})."""
    label, sep, spec = entry.partition(":")
    if not sep or not label:
        raise ConfigError(f"--ttt must look like LABEL:layers=2,3,mb=16, got {entry!r}")
    options: dict[str, Any] = {"layers": []}
    key = None
    for token in spec.split(","):
        name, eq, value = token.partition("=")
        if eq:
            key = {"layers": "layers", "mb": "mini_batch", "lr": "base_lr", "alpha": "alpha"}.get(name.strip())
            if key is None:
                raise ConfigError(f"--ttt {entry!r}: unknown option {name!r} (layers, mb, lr, alpha)")
        elif key != "layers":
            raise ConfigError(f"--ttt {entry!r}: expected NAME=VALUE, got {token!r}")
        value = value if eq else name
        try:
            if key == "layers":
                options["layers"].append(int(value))
            else:
                options[key] = int(value) if key == "mini_batch" else float(value)
        except ValueError:
            raise ConfigError(f"--ttt {entry!r}: {value!r} is not a number") from None
    if not options["layers"]:
        raise ConfigError(f"--ttt {entry!r}: give the layers, e.g. layers=2,3")
    if options.get("mini_batch", 1) < 1:
        raise ConfigError(f"--ttt {entry!r}: mb must be >= 1, got {options['mini_batch']}")
    for key, name in (("base_lr", "lr"), ("alpha", "alpha")):
        if not math.isfinite(options.get(key, 0.0)):
            raise ConfigError(f"--ttt {entry!r}: {name} must be a finite number, got {options[key]}")
    return label, options


def model_label(entry: str) -> str:
    """`baseline=path/to/ckpt` -> "baseline"; without a label: a preset's name, a path's stem, a hub repository's
    name (`HubCheckpoint.label`)."""
    label, spec = _split_entry(entry)
    if label is not None:
        return label
    if is_hub_spec(spec):
        return HubCheckpoint.parse(spec).label()
    return Path(spec).stem if ("/" in spec or spec.endswith(".safetensors")) else spec


def model_spec(entry: str) -> str:
    return _split_entry(entry)[1]


def _split_entry(entry: str) -> tuple[str | None, str]:
    """(label or None, spec) of a --model entry. The `=` of an `hf:` spec's options (`hf:org/name,lora=...`) is not
    a label's: a label has no comma and does not start with `hf:`."""
    label, sep, spec = entry.partition("=")
    if sep and label and "," not in label and not is_hub_spec(label):
        return label, spec
    return None, entry


def hub_flags_entry(flags: dict[str, Any], given_model: bool) -> str:
    """The --model entry that moshi's flags (--hf-repo, --moshi-weight, ..., as `MOSHI_FLAGS` names) describe."""
    if given_model:
        raise ConfigError(
            f"{', '.join('--' + name.replace('_', '-') for name in flags)} describe one model, as python -m "
            "moshi.server takes it, and --model is given too: to compare several models give each as --model "
            "LABEL=hf:ORG/NAME[,moshi=PATH,lora=PATH,config=PATH,fuse_lora=false]")
    try:
        return model_source(**{"hf_repo": DEFAULT_REPO} | flags).spec()  # moshi.server's default repository
    except ValueError as exc:
        raise ConfigError(f"--hf-repo: {exc}") from None
