"""The codes a user hands to an evaluator: laid out in the model's streams, checked and batched before any compute.

Moshi's layout: stream 0 text, streams 1..dep_q the model's own audio codebooks, the rest the user's audio.
`layout_codes` turns audio-only codes into that layout; `check_codes` accepts a LongTensor [B, K, T] in
`LMModel.forward` layout, or a list of [K, T_i] tensors of different lengths, and reports every problem with the
stream, batch index and first offending position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel

from ..errors import DataError

log = logging.getLogger(__name__)

INVALID_TOKEN_POLICIES = ("raise", "mask")  # what check_codes does with a token outside the model's vocabulary
TEXT_FILLS = ("zero", "pad")  # the text stream of audio-only codes: the zero token (never scored) or text padding
OTHER_FILLS = ("zero", "copy")  # the user's audio streams of audio-only codes: the zero token or a copy


@dataclass
class CheckedCodes:
    sequences: list[torch.Tensor]  # each [K, T_i], long, values in range or the zero token
    n_masked_tokens: int  # out-of-range tokens replaced by the zero token (invalid_tokens="mask")


def check_codes(
    model: LMModel, codes: torch.Tensor | list[torch.Tensor], invalid_tokens: str = "raise"
) -> CheckedCodes:
    """Validate `codes` against `model`; with invalid_tokens="mask", replace bad tokens by the zero token.

    A masked token is both an input the model does not see (the zero token embeds to 0) and a target that is
    not scored, exactly like the zero token in `LMModel.forward`.
    """
    if invalid_tokens not in INVALID_TOKEN_POLICIES:
        raise ValueError(f"invalid_tokens must be one of {INVALID_TOKEN_POLICIES}, got {invalid_tokens!r}")
    if isinstance(codes, torch.Tensor):
        if codes.dim() != 3:
            raise ValueError(
                f"codes must be [B, K, T] (or a list of [K, T] tensors), got a tensor of shape {tuple(codes.shape)}"
            )
        sequences = list(codes.unbind(0))
    elif isinstance(codes, (list, tuple)):
        sequences = list(codes)
        if not sequences:
            raise ValueError("codes is an empty list: nothing to evaluate")
        for b, seq in enumerate(sequences):
            if not isinstance(seq, torch.Tensor) or seq.dim() != 2:
                shape = tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
                raise ValueError(f"codes[{b}] must be a [K, T] tensor, got {shape}")
    else:
        raise TypeError(f"codes must be a tensor [B, K, T] or a list of [K, T] tensors, got {type(codes).__name__}")
    if not sequences:
        raise ValueError("codes has batch size 0: nothing to evaluate")

    K = model.num_codebooks
    n_masked = 0
    checked = []
    for b, seq in enumerate(sequences):
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise ValueError(f"codes must hold integer tokens, got dtype {seq.dtype} (batch index {b})")
        if seq.shape[0] != K:
            raise ValueError(
                f"batch index {b} has {seq.shape[0]} streams but the model expects K = model.num_codebooks = {K} "
                f"(1 text + {model.num_audio_codebooks} audio)"
            )
        if seq.shape[1] == 0:
            raise ValueError(f"batch index {b} is empty (T = 0)")
        seq = seq.long()
        bad = _out_of_range(model, seq)
        if bad.any():
            if invalid_tokens == "raise":
                t, k = (int(i) for i in bad.t().nonzero()[0])  # the earliest frame, then the lowest stream
                raise ValueError(_describe_bad_token(model, int(seq[k, t]), k, b, t))
            n_masked += int(bad.sum())
            seq = seq.masked_fill(bad, model.zero_token_id)
        checked.append(seq)
    return CheckedCodes(checked, n_masked)


def pad_batch(model: LMModel, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [B, K, T_max] padded with the zero token, lengths [B])."""
    lengths = torch.tensor([s.shape[1] for s in sequences], dtype=torch.long)
    out = torch.full(
        (len(sequences), sequences[0].shape[0], int(lengths.max())), model.zero_token_id, dtype=torch.long
    )
    for b, seq in enumerate(sequences):
        out[b, :, : seq.shape[1]] = seq
    return out, lengths


def batches_by_length(lengths: list[int], batch_size: int | None) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, longest first so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = len(order) if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [order[i : i + size] for i in range(0, len(order), size)]


def _out_of_range(model: LMModel, seq: torch.Tensor) -> torch.Tensor:
    """[K, T] True where a token is neither a valid code of its stream nor the zero token."""
    upper = torch.full((seq.shape[0], 1), model.card, dtype=torch.long, device=seq.device)
    upper[0] = model.text_card
    return ((seq < 0) & (seq != model.zero_token_id)) | (seq >= upper)


def _describe_bad_token(model: LMModel, value: int, k: int, b: int, t: int) -> str:
    if k == 0:
        stream, allowed = "stream 0 (text)", f"[0, text_card={model.text_card})"
    else:
        stream, allowed = f"stream {k} (audio codebook {k - 1})", f"[0, card={model.card})"
    return (
        f"invalid token {value} in {stream}, batch index {b}, position {t}: tokens must lie in {allowed} or be "
        f"the zero token {model.zero_token_id}; pass invalid_tokens='mask' to mask such tokens instead"
    )


def layout_codes(
    model: LMModel, codes: torch.Tensor, *, text_fill: str = "zero", other_fill: str = "zero", source: str = ""
) -> torch.Tensor:
    """Codes [K, T] in the model's layout from the full layout (as is) or from n >= dep_q audio codebooks.

    Audio codebooks: the first dep_q go to streams 1..dep_q; the text stream gets the zero token (`text_fill=
    "zero"`, never scored) or the text padding id ("pad"); the user streams the zero token (`other_fill="zero"`)
    or a copy of the same audio codes ("copy"). Audio tokens must lie in [0, card) or be the zero token.
    """
    src = source or "codes"
    if text_fill not in TEXT_FILLS:
        raise DataError(f"text fill must be one of {', '.join(TEXT_FILLS)}, got {text_fill!r}")
    if other_fill not in OTHER_FILLS:
        raise DataError(f"other-stream fill must be one of {', '.join(OTHER_FILLS)}, got {other_fill!r}")
    if codes.dim() != 2:
        raise DataError(f"{src} has shape {tuple(codes.shape)}: expected [n_codebooks, T]")
    K, dep_q, zero = model.num_codebooks, model.dep_q, model.zero_token_id
    n, T = codes.shape
    codes = codes.to(torch.int64)
    if n == K:  # already the full layout: text and user streams are the caller's
        _check_audio_range(model, codes[1:], src, first_stream=1)
        return codes.clone()
    if n < dep_q:
        raise DataError(f"model expects dep_q={dep_q} audio codebooks (or all K={K} streams), {src} has {n}")
    if n > dep_q:
        log.info("%s: %d codebooks, using the first dep_q=%d", src, n, dep_q)
    audio = codes[:dep_q]
    _check_audio_range(model, audio, src, first_stream=0)
    out = torch.full((K, T), zero, dtype=torch.int64)
    out[1 : 1 + dep_q] = audio
    if text_fill == "pad":
        if model.existing_text_padding_id is None:
            raise DataError("text fill 'pad' needs a model with a text padding id (existing_text_padding_id)")
        out[0] = model.existing_text_padding_id
    n_user = K - 1 - dep_q
    if other_fill == "copy" and n_user > 0:
        if n_user > dep_q:
            raise DataError(f"cannot copy {dep_q} audio codebooks of {src} into {n_user} user streams")
        out[1 + dep_q :] = audio[:n_user]
    return out


def _check_audio_range(model: LMModel, audio: torch.Tensor, src: str, first_stream: int) -> None:
    bad = ((audio < 0) | (audio >= model.card)) & (audio != model.zero_token_id)
    if bool(bad.any()):
        row, t = (int(i) for i in bad.nonzero()[0])
        raise DataError(
            f"{src} has audio token {int(audio[row, t])} at row {first_stream + row}, frame {t}, outside the "
            f"model's card [0, {model.card}): the Mimi codebooks and the model's card do not match"
        )


def crop_frames(codes: torch.Tensor, max_frames: int | None) -> torch.Tensor:
    """The first `max_frames` frames of codes [n, T]; the tensor itself when `max_frames` is None."""
    return codes if max_frames is None else codes[:, :max_frames]
