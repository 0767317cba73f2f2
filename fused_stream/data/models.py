"""Build or load a Moshi-architecture `LMModel`: named presets with seeded random weights, or a checkpoint.

Checkpoints load through moshi's own loaders. A local checkpoint is a `.safetensors` file (with an optional
`config.json` beside it) or a directory holding `config.json` and the weights file it names (`moshi_name`, default
`model.safetensors`), loaded with `get_moshi_lm`. A Hugging Face checkpoint (`hf:` specs, or moshi's flags as
keywords) is resolved by `CheckpointInfo.from_hf_repo` and built by its `get_moshi` (LoRA included): see
`data.checkpoints`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from ..errors import is_device_fault, one_line
from .checkpoints import HUB_KEYS, CheckpointError, HubCheckpoint, ResolvedHub, is_hub_spec
from .mimi import hub_mimi, load_mimi

# moshi's flags (`python -m moshi.server`), as `load_model` keywords: the repository and HubCheckpoint's overrides.
MOSHI_FLAGS = ("hf_repo", *HUB_KEYS.values())

# Moshi's stream layout: text, 8 Moshi audio codebooks, 8 user audio codebooks; acoustic codebooks delayed by 1.
MOSHI_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# Same structure as Moshi 7B (rope, SiLU gating, RMS norms, multi-linear depformer with weights per step),
# so the small presets run the exact code paths of the real model.
_MOSHI_LIKE: dict[str, Any] = {
    "n_q": 16,
    "dep_q": 8,
    "causal": True,
    "layer_scale": None,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "depformer_layer_scale": None,
    "existing_text_padding_id": 3,
    "delays": MOSHI_DELAYS,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: a context of 16 frames makes "longer than the attention window" cheap to reach.
    "tiny": _MOSHI_LIKE | {
        "dim": 32, "num_heads": 4, "num_layers": 2, "hidden_scale": 2, "context": 16,
        "card": 64, "text_card": 96,
        "depformer_dim": 32, "depformer_num_heads": 4, "depformer_num_layers": 1,
        "depformer_dim_feedforward": 64,
    },
    # ~40M parameters with Moshi's vocabularies and 3000-frame context: the CPU benchmark model.
    "small": _MOSHI_LIKE | {
        "dim": 256, "num_heads": 8, "num_layers": 4, "hidden_scale": 4.125, "context": 3000,
        "card": 2048, "text_card": 32000,
        "depformer_dim": 128, "depformer_num_heads": 4, "depformer_num_layers": 2,
        "depformer_dim_feedforward": int(4.125 * 128),
    },
    # moshi's own 7B configuration (random init): 7.7B parameters, 31 GB in fp32.
    "moshi-7b": dict(loaders._lm_kwargs),
}

# Keys of a moshi `config.json` that describe files or generation, not the LMModel (as moshi's CheckpointInfo).
_NON_LM_CONFIG_KEYS = (
    "moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
    "lm_gen_config", "tts_config", "stt_config", "model_id",
)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the LMModel keyword arguments of preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (what Moshi runs in), fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    spec: str | Path | HubCheckpoint | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **moshi_flags: Any,
) -> LMModel:
    """A model from a spec (see `fused_stream.data.checkpoints`), or from moshi's own flags as keywords.

    `spec`: a preset name (`tiny`, `small`, `moshi-7b`, weights drawn from `seed`), a local checkpoint path, or
    `hf:ORG/NAME[,lora=...,config=...]`. Or, instead of a spec, the keywords of `python -m moshi.server`:
    `hf_repo`, `moshi_weight`, `mimi_weight`, `tokenizer`, `config_path`, `lora_weight`, `fuse_lora`, resolved by
    moshi's `CheckpointInfo.from_hf_repo`. The model is returned in eval mode on `device` (default: CUDA if
    available) in `dtype` (default: bf16 on CUDA, fp32 otherwise).
    """
    return open_model(model_source(spec, **moshi_flags), device, dtype, seed)


def load_model_and_mimi(
    spec: str | Path | HubCheckpoint | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **moshi_flags: Any,
) -> tuple[LMModel, MimiModel]:
    """`load_model(...)` and the Mimi of the same checkpoint (a hub checkpoint: its `mimi_weight`), with the
    model's audio codebooks, on the same device: what tokenizes audio for this model."""
    source = model_source(spec, **moshi_flags)
    if not isinstance(source, (HubCheckpoint, ResolvedHub)):
        raise ValueError(f"model {spec!r} is not a Hugging Face checkpoint, so it comes with no Mimi: load one "
                         "with fused_stream.data.mimi.load_mimi(PATH, num_codebooks)")
    resolved = source.resolve() if isinstance(source, HubCheckpoint) else source
    model = open_model(resolved, device, dtype, seed)
    mimi, _ = load_mimi(hub_mimi(resolved), model.dep_q, model.device)
    return model, mimi


def model_source(spec: str | Path | HubCheckpoint | ResolvedHub | None = None,
                 **moshi_flags: Any) -> str | Path | HubCheckpoint | ResolvedHub:
    """What `spec` (or moshi's flags) names: a preset name, a local path, or a `HubCheckpoint`."""
    unknown = set(moshi_flags) - set(MOSHI_FLAGS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; moshi's are {', '.join(MOSHI_FLAGS)}")
    flags = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in moshi_flags.items() if v is not None}
    if set(flags) - {"fuse_lora"}:  # moshi's flags name the checkpoint
        if spec is not None:
            raise ValueError("give a model spec or moshi's flags (hf_repo=, lora_weight=, ...), not both")
        return HubCheckpoint(repo=flags.pop("hf_repo", loaders.DEFAULT_REPO), **flags)
    if spec is None:
        raise ValueError("no model: give a preset, a checkpoint path, an hf: spec, or hf_repo=")
    if isinstance(spec, str) and is_hub_spec(spec):
        spec = HubCheckpoint.parse(spec)
    if isinstance(spec, HubCheckpoint):
        return spec.with_overrides(fuse_lora=flags.get("fuse_lora"))
    if "fuse_lora" in flags:
        raise ValueError(f"fuse_lora applies to a Hugging Face checkpoint with LoRA weights, not to {spec!r}")
    if isinstance(spec, ResolvedHub):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return spec
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model spec {str(spec)!r} is neither a preset ({', '.join(PRESETS)}), an hf:ORG/NAME checkpoint, nor an "
            "existing path"
        )
    return path


def open_model(source: str | Path | HubCheckpoint | ResolvedHub, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, seed: int = 0) -> LMModel:
    """Build or load the model `model_source` named, on `device` in `dtype` (defaults as `load_model`)."""
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from exc
    dtype = dtype if dtype is not None else default_dtype(device)
    if isinstance(source, str):
        return _build_preset(source, device, dtype, seed)
    if isinstance(source, HubCheckpoint):
        source = source.resolve()
    if isinstance(source, ResolvedHub):
        weights, lm_kwargs, name = Path(source.info.moshi_weights), source.info.lm_config, source.source.spec()

        def load() -> LMModel:
            return source.info.get_moshi(device=device, dtype=dtype, fuse_lora=source.source.fuse_lora)
    else:
        weights, lm_kwargs = resolve_checkpoint(source)
        name = str(weights)

        def load() -> LMModel:
            return loaders.get_moshi_lm(weights, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    try:
        model = load()
    except Exception as exc:  # a corrupt file, a config that does not match the weights, LoRA keys that do not fit
        if is_device_fault(exc):
            raise  # the GPU's fault, not the checkpoint's
        lora = source.info.lora_weights if isinstance(source, ResolvedHub) else None
        reason = (_shape_mismatch(weights, lm_kwargs) or (lora and _missing_adapters(Path(lora), lm_kwargs))
                  or one_line(exc))
        raise CheckpointError(f"could not load the moshi checkpoint {name!r}: {reason}") from exc
    return model.eval()


def _shape_mismatch(weights: Path, lm_kwargs: dict[str, Any] | None) -> str | None:
    """One line naming the first tensors whose shapes differ between the checkpoint's safetensors header and the
    model its config builds (on the meta device: no memory), and the names only one side has; None when that
    cannot be told (not safetensors, unreadable, a config moshi cannot build) or nothing differs."""
    lm_kwargs = None if lm_kwargs is None else {k: v for k, v in lm_kwargs.items() if not k.startswith("lora")}
    shapes = _stored_and_expected(weights, lm_kwargs)
    if shapes is None:
        return None
    stored, expected = shapes
    config = "moshi's default 7B configuration" if lm_kwargs is None else "its config.json"
    parts = []
    differ = [name for name in expected if name in stored and stored[name] != expected[name]]
    if differ:
        shown = ", ".join(f"{n} {list(stored[n])} in the checkpoint vs {list(expected[n])} in the model" for n in
                          differ[:2])
        parts.append(f"{len(differ)} tensors differ in shape from the model built from {config}, first {shown}")
    missing = [name for name in expected if name not in stored]
    if missing:
        parts.append(f"{len(missing)} model tensors missing from the checkpoint, first {', '.join(missing[:2])}")
    unexpected = [name for name in stored if name not in expected]
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors not in the model, first {', '.join(unexpected[:2])}")
    return "; ".join(parts) or None


def _stored_and_expected(
    file: Path, lm_kwargs: dict[str, Any] | None
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]] | None:
    """(name -> shape) of a safetensors file's header and of the model `lm_kwargs` builds on the meta device (no
    memory); None when either cannot be read: the diagnoses built on it are best effort, the loader's message
    stands."""
    try:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        built = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=torch.float32)
    except Exception:
        return None
    return stored, {name: tuple(t.shape) for name, t in built.state_dict().items()}


def _missing_adapters(lora: Path, lm_kwargs: dict[str, Any] | None) -> str | None:
    """One line naming the LoRA adapters the model needs and the file lacks (moshi loads adapters with
    strict=False, so a missing one surfaces as "Cannot copy out of meta tensor") and the file's tensors the model
    has no place for; None when the names agree."""
    shapes = _stored_and_expected(lora, lm_kwargs)
    if shapes is None:
        return None
    stored = set(shapes[0])
    needed = [name for name in shapes[1] if "lora_" in name]
    missing = [name for name in needed if name not in stored]
    unexpected = sorted(stored - set(needed))
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {len(needed)} LoRA adapter tensors the model needs are missing from "
                     f"{lora}, first {', '.join(missing[:2])}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors of {lora} are no adapter of this model, first "
                     f"{', '.join(unexpected[:2])}")
    return "; ".join(parts) or None


def save_checkpoint(model: LMModel, directory: str | Path, lm_kwargs: dict[str, Any]) -> Path:
    """Write `model` in moshi's format (`model.safetensors` + `config.json`) so `load_model(directory)` reads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(lm_kwargs | {"moshi_name": "model.safetensors"}, indent=1))
    return directory


def _build_preset(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> LMModel:
    if name == "moshi-7b" and device.type == "cpu":
        raise ValueError(
            "the moshi-7b preset has 7.7B parameters (31 GB in fp32): build it on a GPU in bf16 "
            "(device='cuda') or on the 'meta' device to inspect its configuration"
        )
    # Fork the RNG so building a model does not disturb the caller's random stream.
    # Every CUDA generator: torch.manual_seed reseeds them all, whatever device the model is built on.
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        model = LMModel(**preset_config(name), device=device, dtype=dtype)
    return model.eval()


def resolve_checkpoint(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, LMModel kwargs or None for moshi's 7B default) of a checkpoint file or directory."""
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    lm_kwargs = None
    weights_name = "model.safetensors"
    if config_path.exists():
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable checkpoint config {str(config_path)!r}: {exc}") from exc
        weights_name = raw.get("moshi_name", weights_name)
        lm_kwargs = {k: v for k, v in raw.items() if k not in _NON_LM_CONFIG_KEYS}
    weights = path / weights_name if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {str(weights)!r} not found")
    return weights, lm_kwargs


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
