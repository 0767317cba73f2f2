"""The codes a user hands to an evaluator: laid out in the model's streams, checked and batched before any compute.

Moshi's layout: stream 0 text, streams 1..dep_q the model's own audio codebooks, the rest the user's audio.
`layout_codes` turns audio-only codes into that layout, refusing shapes and values that cannot be codes (a
transposed tensor, NaN, fractions) with the same rules for the CLI's files and the API's tensors; `check_codes`
accepts a LongTensor [B, K, T] in `LMModel.forward` layout, or a list of [K, T_i] tensors of different lengths, and
reports every problem with the stream, batch index and first offending position; `check_tokens` is its token check
for one file, naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel

from ..errors import DataError

INVALID_TOKEN_POLICIES = ("raise", "mask")  # what check_codes does with a token outside the model's vocabulary
TEXT_FILLS = ("zero", "pad")  # the text stream of audio-only codes: the zero token (never scored) or text padding
OTHER_FILLS = ("zero", "copy")  # the user's audio streams of audio-only codes: the zero token or a copy

log = logging.getLogger(__name__)

MIMI_MAX_CODEBOOKS = 32  # the most codebooks a Mimi has: more rows than this are not audio codes


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
                k, t = _first_bad(bad)
                raise ValueError(_describe_bad_token(model, int(seq[k, t]), k, f"batch index {b}, position {t}"))
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


def check_tokens(model: LMModel, codes: torch.Tensor, source: str) -> None:
    """Raise `DataError` naming `source`, the stream and the frame of the first token of codes [K, T] (the model's
    layout) outside the model's vocabularies: the check of `check_codes` with invalid_tokens="raise", for a file."""
    bad = _out_of_range(model, codes.long())
    if bool(bad.any()):
        k, t = _first_bad(bad)
        raise DataError(f"{source}: {_describe_bad_token(model, int(codes[k, t]), k, f'frame {t}')}")


def _out_of_range(model: LMModel, seq: torch.Tensor) -> torch.Tensor:
    """[K, T] True where a token is neither a valid code of its stream nor the zero token."""
    upper = torch.full((seq.shape[0], 1), model.card, dtype=torch.long, device=seq.device)
    upper[0] = model.text_card
    return ((seq < 0) & (seq != model.zero_token_id)) | (seq >= upper)


def _first_bad(bad: torch.Tensor) -> tuple[int, int]:
    """(stream, frame) of the first True of a [K, T] mask: the earliest frame, then the lowest stream."""
    t, k = (int(i) for i in bad.t().nonzero()[0])
    return k, t


def _describe_bad_token(model: LMModel, value: int, k: int, where: str) -> str:
    if k == 0:
        stream, allowed = "stream 0 (text)", f"[0, text_card={model.text_card})"
    else:
        stream, allowed = f"stream {k} (audio codebook {k - 1})", f"[0, card={model.card})"
    return (
        f"invalid token {value} in {stream}, {where}: tokens must lie in {allowed} or be the zero token "
        f"{model.zero_token_id}; to mask such tokens instead (never scored, counted) pass --invalid-tokens mask "
        f"(CLI) or invalid_tokens='mask' (Python)"
    )


def layout_codes(
    model: LMModel, codes: torch.Tensor, *, text_fill: str = "zero", other_fill: str = "zero", source: str = "",
    from_mimi: bool = False, invalid_tokens: str = "raise",
) -> torch.Tensor:
    """Codes [K, T] in the model's layout from the full layout (as is) or from n >= dep_q audio codebooks.

    Audio codebooks: the first dep_q go to streams 1..dep_q (more than dep_q: a warning names the source); the
    text stream gets the zero token (`text_fill="zero"`, never scored) or the text padding id ("pad"); the user
    streams the zero token (`other_fill="zero"`) or a copy of the same audio codes ("copy"). Audio tokens must lie
    in [0, card) or be the zero token.

    Refused with a `DataError` naming `source` (the CLI's files and the API's items alike): a shape that cannot be
    codes [n_codebooks, T] - more rows than any Mimi has codebooks (MIMI_MAX_CODEBOOKS) unless exactly the model's
    K streams, or more rows than frames (a sequence shorter than its number of codebooks cannot be told from a
    transposed one) - and values that are not integers: bool or complex dtypes, NaN or infinite floats, floats
    with a fraction, and floats too large to hold an integer exactly in their dtype. Whole-valued floats (3.0) are
    accepted, as by the codes-file reader. `from_mimi=True` marks codes this tool has just encoded with Mimi
    ([dep_q, T] by construction): a short file (T <= dep_q) is then not taken for a transposed one.

    An audio token outside [0, card) is refused, unless `invalid_tokens="mask"`: then it is kept as it is, and
    `check_codes` masks and counts it like every other invalid token (as in the full layout).
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
    if not from_mimi:
        check_codes_shape(model, tuple(codes.shape), src)
    codes = integer_codes(codes, src)
    check_range = invalid_tokens != "mask"  # masked later by check_codes, counted in n_masked_tokens
    if n == K:  # already the full layout: text and user streams are the caller's
        if check_range:
            _check_audio_range(model, codes[1:], src, first_stream=1, from_mimi=from_mimi)
        return codes.clone()
    if n < dep_q:
        raise DataError(f"model expects dep_q={dep_q} audio codebooks (or all K={K} streams), {src} has {n}")
    if n > dep_q:
        log.warning("%s: %d audio codebooks, using the first dep_q=%d (the model's own audio streams)", src, n, dep_q)
    audio = codes[:dep_q]
    if check_range:
        _check_audio_range(model, audio, src, first_stream=0, from_mimi=from_mimi)
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


def check_codes_shape(model: LMModel, shape: tuple[int, ...], src: str) -> None:
    """Refuse a [rows, T] shape that cannot be codes [n_codebooks, T]: too many rows, or no more frames than rows.

    One rule for every shape that cannot be told from its transpose: a real sequence has far more frames than
    codebooks, so the longer side is time; when rows >= frames ([8, 1], [8, 8], [17, 17]) nothing tells which side
    is time, and the file is refused rather than read one way at random.
    """
    n, T = shape
    if n > MIMI_MAX_CODEBOOKS and n != model.num_codebooks:
        raise DataError(
            f"{src} has shape {shape}: {n} rows, more codebooks than any Mimi has ({MIMI_MAX_CODEBOOKS}) and not the "
            f"model's K={model.num_codebooks} streams; codes are [n_codebooks, T] (transposed?)"
        )
    if n >= T:
        raise DataError(
            f"{src} has shape {shape}: more rows (codebooks) than frames, or as many; codes are [n_codebooks, T] "
            f"(transposed?); a sequence no longer than its number of codebooks is refused as it cannot be told from a "
            f"transposed one"
        )


def integer_codes(codes: torch.Tensor, src: str) -> torch.Tensor:
    """`codes` as int64, refusing what is not an integer: bool or complex dtypes, NaN or infinite floats, floats
    with a fraction and floats beyond the integers their dtype holds exactly (the value may have been rounded).

    Whole-valued floats (3.0) are accepted. The first offending value is named with its row and frame.
    """
    if codes.dtype == torch.bool or codes.is_complex():
        raise DataError(f"{src} has dtype {codes.dtype}: codes must be integers")
    if codes.is_floating_point():
        finite = torch.isfinite(codes)
        exact = round(2 / torch.finfo(codes.dtype).eps)  # 2^(mantissa bits + 1): every integer up to it is exact
        for bad, what in [(~finite, "a non-finite value"), (finite & (codes != codes.round()), "a non-integer value"),
                          (finite & (codes.abs() > exact), f"beyond {exact}, where {codes.dtype} stops holding every "
                                                           "integer exactly (rounded codes?), the value")]:
            if bool(bad.any()):
                row, t = (int(i) for i in bad.nonzero()[0])
                raise DataError(f"{src} holds {what} {codes[row, t].item()} at row {row}, frame {t}: codes must "
                                f"be integers")
    return codes.to(torch.int64)


def _check_audio_range(model: LMModel, audio: torch.Tensor, src: str, first_stream: int, from_mimi: bool) -> None:
    bad = ((audio < 0) | (audio >= model.card)) & (audio != model.zero_token_id)
    if bool(bad.any()):
        row, t = (int(i) for i in bad.nonzero()[0])
        # Only codes this tool encoded itself come from a Mimi it chose; a file's tokens may come from anywhere.
        why = ("the Mimi codebooks and the model's card do not match" if from_mimi else
               f"tokens must lie in [0, card={model.card}) or be the zero token {model.zero_token_id}; to mask such "
               "tokens instead (never scored, counted) pass --invalid-tokens mask (CLI) or invalid_tokens='mask' "
               "(Python)")
        raise DataError(
            f"{src} has audio token {int(audio[row, t])} at row {first_stream + row}, frame {t}, outside the "
            f"model's card [0, {model.card}): {why}"
        )


def crop_frames(codes: torch.Tensor, max_frames: int | None) -> torch.Tensor:
    """The first `max_frames` frames of codes [n, T]; the tensor itself when `max_frames` is None."""
    return codes if max_frames is None else codes[:, :max_frames]
