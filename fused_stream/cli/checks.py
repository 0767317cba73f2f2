"""Every input of a run checked before its first expensive step, and the fingerprint of what its numbers depend on.

`check_run` runs before any model is loaded or any file written, and reads no weights: the output folder (and the
Mimi cache) must be writable folders; the device, dtype, loss backend and CUDA-graph mode must go together; every
--model must be a preset or a checkpoint whose config is readable; every --ttt layer must exist in its model and
be given once; --codebook-weights must give one finite weight per audio codebook of every model; the data source
must exist and the Mimi must match every model. Its errors are one line (`ConfigError`, `DataError`): the CLI exits
2 with nothing written, in seconds rather than after a model ran.

It also resolves what `auto` means on this machine (device, dtype, loss backend) and builds each model's
fingerprint for OUT/partial/<label>/run.json: the options that change a number (`Settings.fingerprint`), those
resolved values, and the content fingerprints of the model's weights and config and of the Mimi. With --resume it
refuses, here, partial results made with a different fingerprint, naming what changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders

from ..core.config import ConfigError, make_plan
from ..data.codes import CODES_SUFFIXES, codes_files
from ..data.mimi import mimi_checkpoint
from ..data.models import PRESETS, default_device, default_dtype, preset_config, resolve_checkpoint
from ..errors import DataError, one_line
from .distributed import World
from .fingerprints import file_fingerprint
from .partials import check_resume, partial_dir
from .settings import Settings, model_label, model_spec, parse_ttt

# LMModel's defaults for what a checkpoint's config.json may leave out.
_LM_DEFAULTS = {"dep_q": 8, "card": 1024}


@dataclass(frozen=True)
class ModelInfo:
    """What a --model entry is, read from its preset or config.json without loading any weights."""

    entry: str  # the --model value, [LABEL=]SPEC
    label: str
    spec: str
    num_layers: int  # temporal transformer layers: where --ttt may go
    dep_q: int  # audio codebooks the model predicts: one --codebook-weights weight each
    card: int
    content: dict[str, Any]  # fingerprints of the weights (or preset + seed) and the config file


@dataclass(frozen=True)
class RunChecks:
    """The checked run: the resolved device, dtype and loss backend, the models, and each model's fingerprint."""

    device: torch.device
    dtype: torch.dtype
    loss_backend: str
    models: dict[str, ModelInfo]  # by label, in --model order
    fingerprints: dict[str, dict[str, Any]]  # by label

    def fingerprint(self, label: str) -> dict[str, Any]:
        return self.fingerprints[label]


def check_run(s: Settings, world: World) -> RunChecks:
    """Check every input of run `s` on this rank (see the module docstring); raises ConfigError or DataError."""
    check_output(s)
    device = _device(s, world)
    dtype = default_dtype(device) if s.dtype == "auto" else getattr(torch, s.dtype)
    try:
        plan = make_plan(s.eval, device)
    except (ValueError, RuntimeError) as exc:  # triton on a CPU, cuda_graphs=on without CUDA, ...
        raise ConfigError(one_line(exc)) from None
    models = {info.label: info for info in (_model(entry, s, device) for entry in s.model)}
    _check_ttt(s, models)
    _check_codebook_weights(s, models)
    mimi = _check_data(s, models)
    resolved = {"dtype": str(dtype).removeprefix("torch."), "device_type": device.type,
                "loss_backend": plan.loss_backend, "mimi_checkpoint": mimi}
    fingerprints = {label: s.fingerprint(info.entry) | resolved | info.content for label, info in models.items()}
    if s.resume and world.is_main:
        for label, fingerprint in fingerprints.items():
            check_resume(partial_dir(s.out, label), fingerprint)
    return RunChecks(device, dtype, plan.loss_backend, models, fingerprints)


# ------------------------------------------------------------------------------------------------------- output
def check_output(s: Settings) -> None:
    """--out (and, for audio, the codes cache) must be folders this process can create or write in."""
    writable_folder(s.out, "--out")
    if s.audio is not None:
        cache = s.cache_dir if s.cache_dir is not None else str(Path(s.out) / "cache")
        writable_folder(cache, "--cache-dir" if s.cache_dir is not None else "the codes cache")


def writable_folder(path: str | Path, option: str) -> None:
    """ConfigError unless `path` is a writable folder, or can be made one (nothing is created here)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{option} {path} is a broken symbolic link")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path} is an existing file, not a folder")
        folder = path
    else:
        folder = path.absolute().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise ConfigError(f"{option} {path} cannot be created: {folder} is a file, not a folder")
    if _read_only(folder):
        raise ConfigError(f"{option} {path} is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK):
        where = "is not writable" if folder == path else f"cannot be created: {folder} is not writable"
        raise ConfigError(f"{option} {path} {where} by this user")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): os.access decides
        return False


# ------------------------------------------------------------------------------------------------------- device
def _device(s: Settings, world: World) -> torch.device:
    name = world.device(s.device)
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {s.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {s.device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {s.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ------------------------------------------------------------------------------------------------------- models
def _model(entry: str, s: Settings, device: torch.device) -> ModelInfo:
    label, spec = model_label(entry), model_spec(entry)
    if spec in PRESETS:
        if spec == "moshi-7b" and device.type == "cpu":
            raise ConfigError(f"--model {entry}: the moshi-7b preset has 7.7B parameters (31 GB in fp32): run it on a "
                              "GPU (--device cuda)")
        config = preset_config(spec)
        content: dict[str, Any] = {"model_weights": {"preset": spec, "seed": s.seed}, "model_config": None}
    else:
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"--model {entry}: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                              "path")
        try:
            weights, lm_kwargs = resolve_checkpoint(path)
            config_file = (path if path.is_dir() else path.parent) / "config.json"
            content = {"model_weights": file_fingerprint(weights),
                       "model_config": file_fingerprint(config_file) if lm_kwargs is not None else None}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model {entry}: {one_line(exc)}") from None
        config = dict(loaders._lm_kwargs) if lm_kwargs is None else lm_kwargs  # no config.json: moshi's 7B
    config = _LM_DEFAULTS | config
    num_layers, dep_q, card = config.get("num_layers"), config["dep_q"], config["card"]
    for key, value in (("num_layers", num_layers), ("dep_q", dep_q), ("card", card)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--model {entry}: its config gives {key} = {value!r}, not a count")
    return ModelInfo(entry, label, spec, num_layers, dep_q, card, content)


def _check_ttt(s: Settings, models: dict[str, ModelInfo]) -> None:
    """Every --ttt layer exists in its model (negative indices count from the end) and gets one TTT layer."""
    taken: dict[tuple[str, int], str] = {}
    for entry in s.ttt:
        label, options = parse_ttt(entry)
        info = models[label]  # settings.validate: every --ttt names a --model
        n = info.num_layers
        for layer in options["layers"]:
            if not -n <= layer < n:
                raise ConfigError(f"--ttt {entry!r}: layer {layer} does not exist: model {label} ({info.spec}) has "
                                  f"{n} temporal layers (0..{n - 1})")
            key = (label, layer % n)
            if key in taken:
                also = "" if taken[key] == entry else f" by --ttt {taken[key]!r}"
                raise ConfigError(f"--ttt {entry!r}: layer {layer} (layer {layer % n} of {n}) of model {label} "
                                  f"already gets a TTT layer{also}")
            taken[key] = entry


def _check_codebook_weights(s: Settings, models: dict[str, ModelInfo]) -> None:
    """One weight per audio codebook of every model (EvalConfig has already checked the values themselves)."""
    weights = s.eval.codebook_weights
    if weights is None:
        return
    for info in models.values():
        if len(weights) != info.dep_q:
            raise ConfigError(f"--codebook-weights gives {len(weights)} weights but model {info.label} ({info.spec}) "
                              f"has {info.dep_q} audio codebooks: give one weight per codebook")


# --------------------------------------------------------------------------------------------------------- data
def _check_data(s: Settings, models: dict[str, ModelInfo]) -> str | None:
    """The data source exists and the Mimi fits every model; the Mimi's content hash (None without audio)."""
    if s.codes is not None:
        root = Path(s.codes)
        if not (root.is_file() or root.is_dir() and any(p.suffix.lower() in CODES_SUFFIXES for p in root.iterdir())):
            codes_files(root)  # its DataError: missing, or a folder without codes files (else loading tells)
    if s.audio is None:
        return None
    if not Path(s.audio).exists():
        raise DataError(f"audio path {s.audio} does not exist")
    if s.mimi is None:
        return None  # settings.validate: only a disabled run gets here
    _, config, digest = mimi_checkpoint(s.mimi)  # DataError naming the file
    quantizer = config.get("quantizer") or {}
    n_q, card = quantizer.get("n_q"), quantizer.get("bins")
    for info in models.values():
        if card != info.card or not isinstance(n_q, int) or n_q < info.dep_q:
            raise DataError(f"Mimi {s.mimi} has {n_q} codebooks of card {card}; model {info.label} expects "
                            f"dep_q={info.dep_q} of card {info.card}")
    return digest
