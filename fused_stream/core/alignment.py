"""The alignment contract of `LMModel.forward`, written once for every path.

Stream k is delayed by `delays[k]` and an initial token is prepended, giving the delayed sequence D:

    D[b, k, s] = codes[b, k, s - 1 - delays[k]]   if s - 1 - delays[k] >= 0, else the initial token of stream k.

At delayed step s the model reads D[:, :, s] (temporal transformer) and D[:, :, s + 1] (depformer inputs), and
the logits of audio codebook k predict D[:, 1 + k, s + 1] = codes[:, 1 + k, s - delays[1 + k]]: the loss computed
at step s belongs to original time t = s - delays[1 + k]. The same holds for text with delays[0].
"""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel


def audio_delays(model: LMModel) -> list[int]:
    """Delay of each depformer-predicted codebook (streams 1 .. dep_q)."""
    return list(model.delays[model.audio_offset : model.audio_offset + model.dep_q])


def text_delay(model: LMModel) -> int:
    return int(model.delays[0])


def scored_delays(model: LMModel) -> list[int]:
    """Delays of the loss channels in their order: text, then the dep_q audio codebooks."""
    return [text_delay(model)] + audio_delays(model)


def initial_tokens(model: LMModel) -> torch.Tensor:
    """[K] the token each stream reads before its first code (moshi's `_get_initial_token`)."""
    return torch.tensor(
        [model.text_initial_token_id] + [model.initial_token_id] * model.num_audio_codebooks, dtype=torch.long
    )


def delayed_sequence(model: LMModel, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """D [B, K, length] (default T + 1) from codes [B, K, T].

    Past T + 1, stream k first holds its last delays[k] codes, then the zero token (what a padded chunk reads).
    """
    B, K, T = codes.shape
    length = T + 1 if length is None else length
    out = torch.full((B, K, length), model.zero_token_id, dtype=torch.long, device=codes.device)
    initial = initial_tokens(model).to(codes.device)
    for k, delay in enumerate(model.delays):
        head = min(1 + delay, length)
        out[:, k, :head] = initial[k]
        n = max(0, min(T, length - head))
        out[:, k, head : head + n] = codes[:, k, :n]
    return out


def valid_masks(model: LMModel, codes: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio [B, dep_q, T], text [B, 1, T]) bool masks of the positions `LMModel.forward` scores.

    A position t of stream k counts when its prediction step t + delays[k] lies inside the sequence's own
    length (so a short sequence padded into a batch is masked exactly as when evaluated alone) and its code is
    not the zero token.
    """
    B, _, T = codes.shape
    t = torch.arange(T, device=codes.device)
    lengths = lengths.to(codes.device).view(B, 1, 1)
    audio_d = torch.tensor(audio_delays(model), device=codes.device).view(1, -1, 1)
    audio_codes = codes[:, model.audio_offset : model.audio_offset + model.dep_q]
    audio = (t + audio_d < lengths) & (audio_codes != model.zero_token_id)
    text = (t + text_delay(model) < lengths) & (codes[:, :1] != model.zero_token_id)
    return audio, text
