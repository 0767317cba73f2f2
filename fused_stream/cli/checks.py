"""Every input of a run checked before its first expensive step, and the fingerprint of what its numbers depend on.

`check_run` runs before any model is loaded or any file written, and reads no weights: the output folder (and the
Mimi cache) must be writable folders; the device, dtype, loss backend and CUDA-graph mode must go together; the
data source must exist; every --model must be a preset, a local checkpoint whose config is readable, or a Hugging
Face checkpoint that moshi resolves (from the cache offline; online this is where missing files download), whose
config builds an LMModel (on the meta device) whose weights fit the memory the device has free; every --ttt layer
must exist in its model and be given once; --codebook-weights must give one finite weight per audio codebook of
every model; the Mimi (--mimi, or the first model's checkpoint's) must match every model. Its errors are one line
(`ConfigError`, `DataError`): the CLI exits 2 with nothing written, in seconds rather than after a model ran.

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
from ..data.checkpoints import HubCheckpoint, ResolvedHub, is_hub_spec
from ..data.codes import CODES_SUFFIXES, codes_files
from ..data.librilight import audio_files
from ..data.mimi import MimiCheckpoint, hub_mimi, mimi_checkpoint
from ..data.models import PRESETS, count_parameters, default_device, default_dtype, preset_config, resolve_checkpoint
from ..engine.driver import unstreamable
from ..errors import DataError, one_line
from ..options.settings import Settings, model_label, model_spec, parse_ttt
from ..plan.preflight import available_bytes
from .distributed import World
from .fingerprints import file_fingerprint
from .partials import check_resume, partial_dir

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
    source: str | Path | ResolvedHub  # what `data.models.open_model` loads: a preset, a path, a resolved checkpoint
    parameters: int  # of the LMModel its config builds (on the meta device: no memory)


@dataclass(frozen=True)
class RunChecks:
    """The checked run: the resolved device, dtype and loss backend, the models, and each model's fingerprint."""

    device: torch.device
    dtype: torch.dtype
    loss_backend: str
    models: dict[str, ModelInfo]  # by label, in --model order
    fingerprints: dict[str, dict[str, Any]]  # by label
    mimi: str | MimiCheckpoint | None  # what tokenizes --audio: --mimi, or the first model's checkpoint's Mimi

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
    _check_data_paths(s)  # seconds, before a hub checkpoint may download gigabytes
    models = {info.label: info for info in (_model(entry, s, device) for entry in s.model)}
    _check_ttt(s, models)
    _check_codebook_weights(s, models)
    _check_model_memory(models, device, dtype)
    mimi = _check_mimi(s, models)
    resolved = {"dtype": str(dtype).removeprefix("torch."), "device_type": device.type,
                "loss_backend": plan.loss_backend, "mimi_checkpoint": None if mimi is None else mimi.digest}
    fingerprints = {label: s.fingerprint(info.entry) | resolved | info.content for label, info in models.items()}
    if s.resume and world.is_main:
        for label, fingerprint in fingerprints.items():
            check_resume(partial_dir(s.out, label), fingerprint)
    return RunChecks(device, dtype, plan.loss_backend, models, fingerprints, mimi)


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
    if device.type not in ("cpu", "cuda"):  # the memory checks and the engine know these two
        raise ConfigError(f"--device {s.device}: fused_stream runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {s.device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {s.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ------------------------------------------------------------------------------------------------------- models
def _model(entry: str, s: Settings, device: torch.device) -> ModelInfo:
    label, spec = model_label(entry), model_spec(entry)
    source: str | Path | ResolvedHub = spec
    if spec in PRESETS:
        if spec == "moshi-7b" and device.type == "cpu":
            raise ConfigError(f"--model {entry}: the moshi-7b preset has 7.7B parameters (31 GB in fp32): run it on a "
                              "GPU (--device cuda)")
        config = preset_config(spec)
        content: dict[str, Any] = {"model_weights": {"preset": spec, "seed": s.seed}, "model_config": None}
    elif is_hub_spec(spec):
        try:  # moshi's resolution: from the cache offline, else downloading what the cache lacks
            source = HubCheckpoint.parse(spec).resolve()
            content = {name: None if path is None else file_fingerprint(path)
                       for name, path in source.weight_files().items()} | {"model_config": source.config_digest()}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model {entry}: {one_line(exc)}") from None
        config = source.lm_config
    else:
        path = source = Path(spec)
        if not path.exists():
            raise ConfigError(f"--model {entry}: {spec!r} is neither a preset ({', '.join(PRESETS)}), an "
                              "hf:ORG/NAME checkpoint, nor an existing path")
        try:
            weights, lm_kwargs = resolve_checkpoint(path)
            config_file = (path if path.is_dir() else path.parent) / "config.json"
            content = {"model_weights": file_fingerprint(weights),
                       "model_config": file_fingerprint(config_file) if lm_kwargs is not None else None}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model {entry}: {one_line(exc)}") from None
        config = dict(loaders._lm_kwargs) if lm_kwargs is None else lm_kwargs  # no config.json: moshi's 7B
    try:  # the config must build an LMModel at all; on the meta device that costs no memory and ~1 s for a 7B
        base = {k: v for k, v in config.items() if not k.startswith("lora")}  # fused LoRA adds no parameters
        built = loaders.get_moshi_lm(None, lm_kwargs=base, device="meta")
    except Exception as exc:  # noqa: BLE001 - whatever moshi's constructor says about a bad config
        raise ConfigError(f"--model {entry}: its config does not build a moshi LMModel: {one_line(exc)}") from None
    refusal = unstreamable(built)
    if refusal is not None:
        raise ConfigError(f"--model {entry}: {refusal}")
    parameters = count_parameters(built)
    config = _LM_DEFAULTS | config
    num_layers, dep_q, card = config.get("num_layers"), config["dep_q"], config["card"]
    for key, value in (("num_layers", num_layers), ("dep_q", dep_q), ("card", card)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--model {entry}: its config gives {key} = {value!r}, not a count")
    return ModelInfo(entry, label, spec, num_layers, dep_q, card, content, source, parameters)


def _check_model_memory(models: dict[str, ModelInfo], device: torch.device, dtype: torch.dtype) -> None:
    """Each model's weights alone must fit the memory the device has free (models load one at a time): a 7B in
    float32 on a 24 GB machine is refused here, not killed by the kernel minutes into loading it."""
    available, source = available_bytes(device)
    for info in models.values():
        needed = info.parameters * dtype.itemsize
        if needed > available:
            dtype_name = str(dtype).removeprefix("torch.")
            raise ConfigError(
                f"--model {info.entry}: {info.parameters / 1e9:.2f}B parameters take {needed / 2**30:.1f} GiB in "
                f"{dtype_name} but {device} has {available / 2**30:.1f} GiB available ({source}): use a GPU "
                "(--device cuda) or a smaller dtype (--dtype bfloat16)")


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
def _check_data_paths(s: Settings) -> None:
    """The data source exists (reading nothing but folder listings)."""
    if s.codes is not None:
        root = Path(s.codes)
        if not (root.is_file() or root.is_dir() and any(p.suffix.lower() in CODES_SUFFIXES for p in root.iterdir())):
            codes_files(root)  # its DataError: missing, or a folder without codes files (else loading tells)
    if s.audio is not None and not Path(s.audio).exists():
        raise DataError(f"audio path {s.audio} does not exist")
    selection = s.selection()
    if selection is not None:  # the book a config names is there (a listing, nothing decoded)
        root = Path(s.audio)
        selection.groups(audio_files(root), root if root.is_dir() else root.parent)
    if s.mimi is not None and s.audio is not None and not Path(s.mimi).exists():
        raise DataError(f"Mimi checkpoint {s.mimi} not found")


def _check_mimi(s: Settings, models: dict[str, ModelInfo]) -> MimiCheckpoint | None:
    """The Mimi that tokenizes --audio (--mimi, or the first model's checkpoint's), checked against every model;
    None without audio."""
    if s.audio is None:
        return None
    hub = [info for info in models.values() if isinstance(info.source, ResolvedHub)]
    if s.mimi is not None:
        mimi = mimi_checkpoint(s.mimi)  # DataError naming the file
    elif hub and hub[0] is next(iter(models.values())):
        mimi = hub_mimi(hub[0].source)
        for info in hub[1:]:  # each model's own Mimi must be the one the shared data is tokenized with
            other = hub_mimi(info.source)
            if other.digest != mimi.digest:
                raise DataError(f"models {hub[0].label} and {info.label} come with different Mimi checkpoints "
                                f"({mimi.name}, {other.name}): the data is tokenized once, so choose one with --mimi")
    else:
        return None  # settings.validate: only a disabled run gets here
    quantizer = mimi.config.get("quantizer") or {}
    n_q, card = quantizer.get("n_q"), quantizer.get("bins")
    for info in models.values():
        if card != info.card or not isinstance(n_q, int) or n_q < info.dep_q:
            raise DataError(f"Mimi {mimi.name} has {n_q} codebooks of card {card}; model {info.label} expects "
                            f"dep_q={info.dep_q} of card {info.card}")
    return mimi
