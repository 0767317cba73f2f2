"""Codes for the data tests, made here: random audio codes, full-layout codes, and writers for every codes format."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

K, DEP_Q, CARD = 17, 8, 64  # the tiny preset: text + 8 Moshi audio + 8 user audio streams, audio card 64


def audio_codes(n: int = DEP_Q, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CARD, (n, T), generator=torch.Generator().manual_seed(seed))


def full_codes(T: int = 20) -> torch.Tensor:
    """[K, T] codes in the model's full layout (T >= K: fewer frames than rows is refused as transposed)."""
    codes = torch.cat([torch.full((1, T), 3), audio_codes(16, T)])
    codes[9:, :2] = -1  # zero tokens in the user streams are legal in the full layout
    return codes


def save_codes(path, codes, kind):
    """`codes` written to `path` in format `kind` (a key of SUFFIX: the dict kinds test key lookup); returns path."""
    if kind == "pt":
        torch.save(codes, path)
    elif kind == "pt-dict":
        torch.save({"codes": codes, "meta": torch.zeros(1)}, path)
    elif kind == "pt-single":
        torch.save({"anything": codes}, path)
    elif kind == "npy":
        np.save(path, codes.numpy().astype(np.int16))
    elif kind == "safetensors":
        save_file({"codes": codes.contiguous()}, str(path))
    elif kind == "safetensors-single":
        save_file({"x": codes.contiguous()}, str(path))
    return path


SUFFIX = {"pt": ".pt", "pt-dict": ".pt", "pt-single": ".pt", "npy": ".npy", "safetensors": ".safetensors",
          "safetensors-single": ".safetensors"}
