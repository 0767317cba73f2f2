"""Mimi checkpoints: a small real-framing config, seeded random weights, saving, locating and loading.

Audio becomes codes through a local Mimi (moshi's own model and loader); this module finds and loads one, and
hashes it (weights + config) so cached codes know which Mimi made them. `small_mimi_config` and `random_mimi`
build a ~130k-parameter Mimi with moshi's real framing whose codebooks spread the codes, for tests and the
synthetic demo. Problems with a checkpoint raise `DataError`, one line naming the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from ..core.runtime import inference_mode
from ..errors import DataError, is_device_fault, one_line

MIMI_WEIGHTS = "mimi.safetensors"  # default weights file name of a Mimi checkpoint directory


def small_mimi_config(card: int = 64, n_q: int = 8) -> dict[str, Any]:
    """A ~130k-parameter Mimi configuration with moshi's real framing (24 kHz, 12.5 Hz: 1920 samples per frame).

    Same module structure as moshi's Mimi (SEANet ratios 8·6·5·4, conv downsampling 25 → 12.5 Hz, split RVQ,
    projected streaming transformer), only narrower: tests and the synthetic demo exercise the real code paths.
    """
    if n_q < 2:
        raise ValueError(f"Mimi's split quantizer needs n_q >= 2 (one semantic + acoustic), got {n_q}")
    config = copy.deepcopy(loaders._mimi_config)
    dim = 32
    config["seanet"].update(n_filters=4, dimension=dim)
    config["quantizer"].update(dimension=16, n_q=n_q, bins=card, input_dimension=dim, output_dimension=dim)
    config["transformer"].update(
        d_model=dim, num_heads=2, num_layers=1, dim_feedforward=64, input_dimension=dim, output_dimensions=[dim]
    )
    return config


def random_mimi(mimi_config: dict[str, Any], seed: int = 0, device: torch.device | str = "cpu") -> MimiModel:
    """A Mimi with seeded random weights whose codebooks actually spread the codes (for tests and demos).

    Why: a freshly built Mimi has all-zero codebooks, so every frame encodes to code 0 and nothing downstream
    can be checked. Like a k-means initialisation, each codebook level gets entries drawn from its own input
    (the residual the levels before it leave) on 8 s of seeded calibration sound: tones of random pitch plus
    noise, with loudness stepping over 40 dB every 0.1 s. Real audio then uses many codes at every level.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, mimi_config, device="cpu", num_codebooks=mimi_config["quantizer"]["n_q"])
    rate, step = mimi.sample_rate, mimi.sample_rate // 10
    steps = 80
    loudness = (10 ** (-2 * torch.rand(steps, generator=generator))).repeat_interleave(step)
    pitch = (80 * 2 ** (3 * torch.rand(steps, generator=generator))).repeat_interleave(step)
    tone = torch.sin(2 * math.pi * torch.cumsum(pitch, 0) / rate)
    sound = 0.5 * loudness * (tone + 0.3 * torch.randn(steps * step, generator=generator))
    with inference_mode(mimi):
        latent = mimi._encode_to_unquantized_latent(sound.view(1, 1, -1).expand(1, mimi.channels, -1))
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)
            for layer in rvq.vq.layers:
                book = layer._codebook
                z = layer.project_in(residual.transpose(1, 2)).reshape(-1, book.dim)  # [frames, dim]
                picks = torch.randint(0, z.shape[0], (book.codebook_size,), generator=generator)
                jitter = 0.5 * z.std(0) * torch.randn(book.codebook_size, book.dim, generator=generator)
                book.embedding_sum.copy_(z[picks] + jitter)  # cluster_usage 1: embedding = embedding_sum
                book.cluster_usage.fill_(1.0)
                book._initialized.fill_(1.0)
                book._embedding = None  # moshi caches embedding_sum / cluster_usage here on first use
                residual = residual - layer.decode(layer.encode(residual))
    return mimi.to(device).eval()


def save_mimi_checkpoint(mimi: MimiModel, directory: str | Path, mimi_config: dict[str, Any]) -> Path:
    """Write `directory/config.json` (the Mimi config + "weights") and `directory/mimi.safetensors`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in mimi.state_dict().items()}
    save_file(state, str(directory / MIMI_WEIGHTS))
    (directory / "config.json").write_text(json.dumps(mimi_config | {"weights": MIMI_WEIGHTS}, indent=1))
    return directory


@dataclass(frozen=True)
class MimiCheckpoint:
    """A Mimi on disk: its weights file, the config it is built with, and the content hash of both (what cached
    codes are keyed by). `name` is how messages call it (the path or checkpoint the user gave)."""

    weights: Path
    config: dict[str, Any]
    digest: str
    name: str


def mimi_checkpoint(source: str | Path | MimiCheckpoint) -> MimiCheckpoint:
    """A .safetensors file (moshi's default config) or a directory (config.json + weights), checked and hashed."""
    if isinstance(source, MimiCheckpoint):
        return source
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise DataError(f"Mimi checkpoint directory {path} has no config.json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"Mimi config {config_path} is unreadable: {one_line(exc)}") from exc
        if not isinstance(config, dict):
            raise DataError(f"Mimi config {config_path} is not a JSON object (see small_mimi_config())")
        missing = [k for k in ("seanet", "quantizer", "transformer") if not isinstance(config.get(k), dict)]
        missing += [k for k in ("sample_rate", "channels", "frame_rate") if k not in config]
        if missing:
            raise DataError(f"Mimi config {config_path} lacks {', '.join(missing)} (see small_mimi_config())")
        weights = path / str(config.pop("weights", MIMI_WEIGHTS))
        return _hashed(weights, config, str(path), extra=True)
    if path.is_file():
        return _hashed(path, None, str(path))
    raise DataError(f"Mimi checkpoint {path} not found")


def hub_mimi(resolved: Any) -> MimiCheckpoint:
    """The Mimi of a resolved Hugging Face checkpoint (`data.checkpoints.ResolvedHub`): moshi's `mimi_weights`, with
    the repository's Mimi config when it names one."""
    info = resolved.info
    return _hashed(Path(info.mimi_weights), info.mimi_config, f"{info.mimi_weights} (from {resolved.source.spec()})",
                   extra=info.mimi_config is not None)


def _hashed(weights: Path, config: dict[str, Any] | None, name: str, extra: bool = False) -> MimiCheckpoint:
    """The checkpoint with its hash: the weights' sha256, and the config's when it is not moshi's default (the
    config shapes the codes)."""
    if not weights.is_file():
        raise DataError(f"Mimi weights {weights} not found")
    config = copy.deepcopy(loaders._mimi_config) if config is None else config
    digest = hashlib.sha256(file_sha256(weights).encode() + (json.dumps(config, sort_keys=True).encode() if extra
                                                              else b""))
    return MimiCheckpoint(weights, config, digest.hexdigest(), name)


def load_mimi(source: str | Path | MimiCheckpoint, num_codebooks: int,
              device: torch.device | str = "cpu") -> tuple[MimiModel, str]:
    """A Mimi through moshi's `get_mimi`, in eval mode, and the hex sha256 of its weights (+ config)."""
    checkpoint = mimi_checkpoint(source)
    quantizer = checkpoint.config["quantizer"]
    n_q, card = quantizer.get("n_q"), quantizer.get("bins")
    if not isinstance(n_q, int) or not 1 <= num_codebooks <= n_q:
        raise DataError(f"Mimi {checkpoint.name} has {n_q} codebooks of card {card}; asked for "
                        f"num_codebooks={num_codebooks}")
    try:
        mimi = loaders.get_mimi(checkpoint.weights, checkpoint.config, device=device, num_codebooks=num_codebooks)
    except Exception as exc:  # a corrupt file, or weights that do not match the config
        if is_device_fault(exc):
            raise  # the GPU's fault, not the file's
        raise DataError(f"could not load Mimi {checkpoint.weights}: {one_line(exc)}") from exc
    return mimi.eval(), checkpoint.digest


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
