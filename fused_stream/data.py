"""Codes to evaluate. For now: synthetic sequences in the model's stream layout (audio files come later)."""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel


def generate_codes(model: LMModel, n: int, frames: int | list[int], seed: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """Uniformly random tokens: text in [0, text_card), audio in [0, card).

    `frames` an int gives a tensor [n, K, frames]; a list of lengths gives a list of [K, T_i] tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = [frames] * n if isinstance(frames, int) else list(frames)
    if len(lengths) != n:
        raise ValueError(f"got {len(lengths)} lengths for {n} sequences")
    sequences = []
    for T in lengths:
        seq = torch.randint(0, model.card, (model.num_codebooks, T), generator=generator)
        seq[0] = torch.randint(0, model.text_card, (T,), generator=generator)
        sequences.append(seq)
    return torch.stack(sequences) if isinstance(frames, int) else sequences
