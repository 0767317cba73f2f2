"""A Hugging Face hub cache in a temporary folder, holding small moshi checkpoints, and LoRA adapters made by moshi.

The layout is the one `huggingface_hub` writes and reads (`hub/models--ORG--NAME/{refs/main, snapshots/SHA/FILE}`,
`.no_exist/SHA/FILE` for a file the hub said it does not have), so moshi's `CheckpointInfo.from_hf_repo` resolves
from it offline exactly as it would from a real cache. `offline_hub(monkeypatch, root)` points the hub library at it
with `HF_HUB_OFFLINE` set, for this test only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from moshi.models import loaders
from moshi.modules.lora import replace_all_linear_with_lora
from safetensors.torch import save_file

from fused_stream.data.mimi import MIMI_WEIGHTS, random_mimi, small_mimi_config
from fused_stream.data.models import load_model, preset_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER = "tokenizer_spm_test.model"


def offline_hub(monkeypatch: Any, root: Path) -> Path:
    """Point huggingface_hub at the cache `root/hub`, offline (the environment variables are read at import, so the
    constants are patched too, for subprocesses and for this process)."""
    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def add_repo(cache: Path, repo: str, files: dict[str, Path | bytes | str], missing: tuple[str, ...] = ()) -> Path:
    """Put `files` (name -> a file to copy, or its content) in the cache as `repo`'s main revision; `missing` are
    recorded as files the hub does not have. Returns the snapshot folder."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)
    for name in missing:
        marker = folder / ".no_exist" / COMMIT / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return snapshot


def tiny_hub_repo(cache: Path, tmp: Path, repo: str = "kyutai/tiny-moshi", seed: int = 0) -> dict[str, Any]:
    """A repository like kyutai's: config.json naming the files, model weights, a Mimi and a tokenizer file.
    Returns the LM config and the paths written."""
    lm = preset_config("tiny")
    model = load_model("tiny", device="cpu", seed=seed)
    mimi_config = small_mimi_config(card=lm["card"], n_q=8)
    mimi = random_mimi(mimi_config, seed=seed)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(tmp / MIMI_WEIGHTS))
    config = lm | {"moshi_name": "model.safetensors", "mimi_name": MIMI_WEIGHTS, "tokenizer_name": TOKENIZER,
                   "mimi_config_name": "mimi_config.json"}
    snapshot = add_repo(cache, repo, {
        "config.json": json.dumps(config), "model.safetensors": tmp / "model.safetensors",
        MIMI_WEIGHTS: tmp / MIMI_WEIGHTS, TOKENIZER: b"not used for evaluation",
        "mimi_config.json": json.dumps(mimi_config),
    })
    return {"lm": lm, "config": config, "mimi_config": mimi_config, "snapshot": snapshot, "repo": repo}


def lora_adapter(base_repo: dict[str, Any], out: Path, rank: int = 4, scaling: float = 2.0, seed: int = 1) -> dict:
    """A moshi-finetune-style LoRA run: `out/consolidated/lora.safetensors` (non-zero adapters of every linear, made
    with moshi's `replace_all_linear_with_lora`) and `out/consolidated/config.json` (the base config + lora keys)."""
    model = loaders.get_moshi_lm(base_repo["snapshot"] / "model.safetensors", lm_kwargs=base_repo["lm"], device="cpu",
                                 dtype=torch.float32)
    replace_all_linear_with_lora(model, rank, scaling, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            adapters[name] = 0.05 * torch.randn(tensor.shape, generator=generator)
    folder = out / "consolidated"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapters, str(folder / "lora.safetensors"))
    config = base_repo["config"] | {"lora": True, "lora_rank": rank, "lora_scaling": scaling}
    (folder / "config.json").write_text(json.dumps(config))
    return {"lora": folder / "lora.safetensors", "config": folder / "config.json", "lm": config}


def legacy_hub_repo(cache: Path, repo: str, recorded: bool = True) -> Path:
    """A legacy Moshi 7B repository (no config.json), its files under the names moshi expects there, holding dummy
    bytes (to resolve, not to load). `recorded`: the cache has the hub's answer that there is no config.json."""
    files = {loaders.MOSHI_NAME: b"not weights", loaders.MIMI_NAME: b"not weights",
             loaders.TEXT_TOKENIZER_NAME: b"not a tokenizer"}
    return add_repo(cache, repo, files, missing=("config.json",) if recorded else ())
