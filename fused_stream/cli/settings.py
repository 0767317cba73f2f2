"""The settings of one evaluation run: built-in defaults < a YAML config file < the command line.

A config file holds CLI options by name (`chunk_size: 16` or `chunk-size: 16`) and/or the block finetune configs
already carry, `paper_metrics: {librilight_streaming: {...}}` (or that block at the top level), whose legacy keys map
onto options: `max_sequence_length` -> max_frames, `memory_check` -> assert_constant_memory, `enabled: false` ->
the run is skipped, `librilight_audio_dir` -> audio, `librilight_max_files` -> max_files. `cache_clear_interval`
is accepted and ignored (streaming memory is constant by construction: there is nothing to clear);
`ttt_verification` is recorded and reported. Unknown keys are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..version import __version__

DEMO_SEQUENCES = 4  # the embedded default: 4 generated sequences of 200 frames on `tiny`


class SettingsError(ValueError):
    """A bad option or config file: the message names it."""


@dataclass
class Settings:
    model: list[str] = field(default_factory=lambda: ["tiny"])
    ttt: list[str] = field(default_factory=list)  # "LABEL:layers=2,3,mb=16[,lr=1.0,alpha=0.1]": attach TTT to LABEL
    codes: str | None = None
    audio: str | None = None
    mimi: str | None = None
    generate: int | None = None  # None: DEMO_SEQUENCES when no --codes / --audio is given
    frames: int = 200
    max_frames: int | None = None
    max_files: int | None = None
    concat_chapters: bool = False
    text_fill: str = "zero"
    other_fill: str = "zero"
    cache_dir: str | None = None
    batch_size: int | str = "auto"
    chunk_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    loss_backend: str = "auto"
    cuda_graphs: str = "auto"
    window: int = 1000
    codebook_weights: list[float] | None = None
    out: str = "fused_stream_out"
    seed: int = 0
    verify: bool | None = None  # None: on for generated data (the demo proves parity), off otherwise
    verify_frames: int = 256
    assert_constant_memory: bool = False
    resume: bool = False
    keep_going: bool = False
    min_frames: int = 1
    ttt_verification: bool = False
    enabled: bool = True
    progress: bool = True
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose, 2 debug
    config: str | None = None

    @property
    def synthetic(self) -> bool:
        return self.codes is None and self.audio is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self, spec: str) -> dict[str, Any]:
        """What decides a sequence's losses: a resumed run must match it (batch size, device, output do not)."""
        keys = ("ttt", "codes", "audio", "mimi", "generate", "frames", "max_frames", "max_files", "min_frames",
                "concat_chapters", "text_fill", "other_fill", "chunk_size", "dtype", "seed")
        return {"model": spec, "fused_stream": __version__} | {k: getattr(self, k) for k in keys}


LEGACY_KEYS = {
    "max_sequence_length": "max_frames",
    "memory_check": "assert_constant_memory",
    "librilight_audio_dir": "audio",
    "librilight_max_files": "max_files",
    "enabled": "enabled",
    "ttt_verification": "ttt_verification",
}
IGNORED_KEYS = {"cache_clear_interval"}  # legacy knob with nothing left to do


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults, then the `--config` file, then every option given on the command line (None = not given)."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_config(args.config))
    values.update({k: v for k, v in vars(args).items() if v is not None and k in _FIELDS})
    settings = Settings(**values)
    validate(settings)
    return settings


def read_config(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML file (see the module docstring for the accepted keys)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(f"config file {path} must hold a mapping of options, got {type(raw).__name__}")
    block = raw.pop("paper_metrics", None)
    if isinstance(block, dict):
        raw = {**block.get("librilight_streaming", {}), **raw}
    elif block is not None:
        raise SettingsError(f"config file {path}: paper_metrics must be a mapping")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = LEGACY_KEYS.get(name, name)
        if name in IGNORED_KEYS:
            continue
        if name not in _FIELDS or name in ("config", "verbosity", "progress"):
            raise SettingsError(f"config file {path}: unknown key {key!r}")
        out[name] = _coerce(name, value, path)
    return out


def _coerce(name: str, value: Any, path: Path) -> Any:
    if name in ("model", "ttt") and isinstance(value, str):
        return [value]
    if name == "codebook_weights" and isinstance(value, str):
        return parse_weights(value)
    if name in ("audio", "codes", "mimi", "cache_dir", "out") and value is not None:
        return str(value)
    return value


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise SettingsError(f"codebook weights must be comma-separated numbers, got {text!r}") from None
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise SettingsError(f"codebook weights must be >= 0 with at least one > 0, got {text!r}")
    return weights


_CHOICES = {
    "text_fill": ("zero", "pad"),
    "other_fill": ("zero", "copy"),
    "loss_backend": ("auto", "torch", "triton"),
    "cuda_graphs": ("auto", "on", "off"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


def validate(s: Settings) -> None:
    sources = [name for name in ("codes", "audio") if getattr(s, name) is not None]
    if len(sources) > 1 or (sources and s.generate is not None):
        raise SettingsError("give one data source: --codes, --audio or --generate")
    if s.audio is not None and s.mimi is None:
        raise SettingsError("--audio needs --mimi PATH (a local Mimi checkpoint to tokenize the audio)")
    counts = ("generate", "frames", "max_frames", "max_files", "min_frames", "chunk_size", "window", "verify_frames")
    for name in counts:
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SettingsError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if s.batch_size != "auto" and (not isinstance(s.batch_size, int) or s.batch_size < 1):
        raise SettingsError(f"--batch-size must be an integer >= 1 or 'auto', got {s.batch_size!r}")
    for name, allowed in _CHOICES.items():
        if getattr(s, name) not in allowed:
            option = name.replace("_", "-")
            raise SettingsError(f"--{option} must be one of {', '.join(allowed)}, got {getattr(s, name)!r}")
    if not s.model:
        raise SettingsError("--model needs at least one preset or checkpoint")
    labels = [model_label(spec) for spec in s.model]
    if len(set(labels)) != len(labels):
        raise SettingsError(f"two --model entries share a label ({', '.join(labels)}): name them LABEL=SPEC")
    for entry in s.ttt:
        label = parse_ttt(entry)[0]
        if label not in labels:
            raise SettingsError(f"--ttt {entry!r}: no --model is labelled {label!r} (labels: {', '.join(labels)})")


def parse_ttt(entry: str) -> tuple[str, dict[str, Any]]:
    """`ttt:layers=2,3,mb=16,lr=1.0,alpha=0.1` -> ("ttt", {"layers": [2, 3], "mini_batch": 16, ...})."""
    label, sep, spec = entry.partition(":")
    if not sep or not label:
        raise SettingsError(f"--ttt must look like LABEL:layers=2,3,mb=16, got {entry!r}")
    options: dict[str, Any] = {"layers": []}
    key = None
    for token in spec.split(","):
        name, eq, value = token.partition("=")
        if eq:
            key = {"layers": "layers", "mb": "mini_batch", "lr": "base_lr", "alpha": "alpha"}.get(name.strip())
            if key is None:
                raise SettingsError(f"--ttt {entry!r}: unknown option {name!r} (layers, mb, lr, alpha)")
        elif key != "layers":
            raise SettingsError(f"--ttt {entry!r}: expected NAME=VALUE, got {token!r}")
        value = value if eq else name
        try:
            if key == "layers":
                options["layers"].append(int(value))
            else:
                options[key] = int(value) if key == "mini_batch" else float(value)
        except ValueError:
            raise SettingsError(f"--ttt {entry!r}: {value!r} is not a number") from None
    if not options["layers"]:
        raise SettingsError(f"--ttt {entry!r}: give the layers, e.g. layers=2,3")
    return label, options


def model_label(spec: str) -> str:
    """`baseline=path/to/ckpt` -> "baseline"; a preset or path without a label -> its name."""
    if "=" in spec:
        return spec.split("=", 1)[0]
    return Path(spec).stem if ("/" in spec or spec.endswith(".safetensors")) else spec


def model_spec(spec: str) -> str:
    return spec.split("=", 1)[1] if "=" in spec else spec


_FIELDS = {f.name for f in fields(Settings)}
