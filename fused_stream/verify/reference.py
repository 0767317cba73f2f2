"""Reference paths the streaming driver is measured against.

- `batch_losses`: the batch methodology — one `LMModel.forward` over the whole sequence + `F.cross_entropy`.
  Exact by definition, but attention is T x T: memory grows O(T^2) and long files do not fit.
- `naive_streaming_losses`: the per-frame loop of the original plan, one frame per step with a `.float()` copy of
  the logits, `F.cross_entropy` per codebook and an `.item()` host sync per value — correctly aligned.
  It is the baseline the benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel

from ..core.alignment import audio_delays, delayed_sequence, text_delay
from ..core.inputs import check_codes, pad_batch
from ..core.result import EvalResult, empty_result, fill_rows
from ..core.runtime import inference_mode


def batch_losses(model: LMModel, codes: torch.Tensor | list[torch.Tensor], invalid_tokens: str = "raise") -> EvalResult:
    """Per-position losses from one `LMModel.forward` per batch (a [B, K, T] tensor) or per sequence (a list)."""
    checked = check_codes(model, codes, invalid_tokens)
    groups = [list(range(len(checked.sequences)))] if isinstance(codes, torch.Tensor) else [
        [i] for i in range(len(checked.sequences))
    ]
    result = _run(model, checked.sequences, groups, _batch_forward, path="batch")
    result.n_masked_tokens = checked.n_masked_tokens
    return result


def naive_streaming_losses(
    model: LMModel, codes: torch.Tensor | list[torch.Tensor], invalid_tokens: str = "raise"
) -> EvalResult:
    """Per-position losses from the seed's per-frame loop (one sequence at a time, host sync per value)."""
    checked = check_codes(model, codes, invalid_tokens)
    groups = [[i] for i in range(len(checked.sequences))]
    result = _run(model, checked.sequences, groups, _naive_stream, path="naive_streaming")
    result.n_masked_tokens = checked.n_masked_tokens
    return result


# (model, codes [B, K, T]) -> (losses [B, dep_q, T], text [B, 1, T], valid, text_valid), all on the host
PathFn = Callable[[LMModel, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _run(model: LMModel, sequences: list[torch.Tensor], groups: list[list[int]], fn: PathFn, path: str) -> EvalResult:
    """Each group is one padded batch; a path only ever sees groups whose sequences share one length."""
    result = empty_result(len(sequences), model.dep_q, max(s.shape[1] for s in sequences))
    start = time.perf_counter()
    with inference_mode(model):
        for rows in groups:
            codes, lengths = pad_batch(model, [sequences[i] for i in rows])
            losses, text_losses, valid, text_valid = fn(model, codes)
            fill_rows(result, rows, losses, text_losses, valid, text_valid, lengths)
    elapsed = time.perf_counter() - start
    frames = int(result.lengths.sum())
    result.report.update(path=path, frames=frames, seconds=elapsed, frames_per_second=frames / elapsed)
    return result


def _batch_forward(
    model: LMModel, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Losses and LMModel.forward's own masks (independent of `fused_stream.alignment`)."""
    device = next(model.parameters()).device
    codes = codes.to(device)
    out = model(codes)  # logits [B, dep_q, T, card], NaN where invalid
    audio_targets = codes[:, model.audio_offset : model.audio_offset + model.dep_q]
    losses = _masked_cross_entropy(out.logits, audio_targets, out.mask)
    text_losses = _masked_cross_entropy(out.text_logits, codes[:, :1], out.text_mask)
    return losses.cpu(), text_losses.cpu(), out.mask.cpu(), out.text_mask.cpu()


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy per position of logits [B, K, T, V] in float32; NaN where `mask` is False."""
    B, K, T, V = logits.shape
    # Invalid positions hold NaN logits and arbitrary targets; score a harmless stand-in and mask it after.
    safe_logits = torch.where(mask.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    losses = F.cross_entropy(
        safe_logits.reshape(-1, V).float(), safe_targets.reshape(-1), reduction="none"
    ).view(B, K, T)
    return torch.where(mask, losses, torch.full_like(losses, float("nan")))


def _naive_stream(
    model: LMModel, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loop's own validity: a position counts where the loop scored it (a code in range, t >= 0)."""
    device = next(model.parameters()).device
    B, _, T = codes.shape
    assert B == 1, "the naive loop evaluates one sequence at a time"
    delayed = delayed_sequence(model, codes.to(device))  # [1, K, T + 1]
    a_delays, t_delay = audio_delays(model), text_delay(model)
    audio: list[list[float]] = [[float("nan")] * T for _ in range(model.dep_q)]
    text: list[float] = [float("nan")] * T
    with model.streaming(1):
        for s in range(T):
            transformer_out, text_logits = model.forward_text(delayed[:, :, s : s + 1])
            logits = model.forward_depformer_training(delayed[:, :, s + 1 : s + 2], transformer_out).float()
            target = delayed[:, :, s + 1]  # [1, K]
            for k, delay in enumerate(a_delays):
                t, tok = s - delay, target[:, model.audio_offset + k]
                if 0 <= t and 0 <= tok.item() < model.card:
                    audio[k][t] = F.cross_entropy(logits[:, k, 0], tok).item()
            t, tok = s - t_delay, target[:, 0]
            if 0 <= t and 0 <= tok.item() < model.text_card:
                text[t] = F.cross_entropy(text_logits[:, 0, 0].float(), tok).item()
    audio_losses, text_losses = torch.tensor(audio).unsqueeze(0), torch.tensor([text]).unsqueeze(0)
    return audio_losses, text_losses, ~audio_losses.isnan(), ~text_losses.isnan()


@contextlib.contextmanager
def _upcast(model: LMModel) -> Iterator[None]:
    """The model's half-precision parameters and buffers as float32 copies, and the very same storage back after
    (bit for bit, same addresses: captured graphs and optimizers holding them see nothing)."""
    held = [(t, t.data) for t in itertools.chain(model.parameters(), model.buffers())
            if t.dtype in (torch.float16, torch.bfloat16)]
    try:
        for tensor, data in held:
            tensor.data = data.float()
        yield
    finally:
        for tensor, data in held:
            tensor.data = data


def float32_reference(model: LMModel, codes: torch.Tensor | list[torch.Tensor]) -> EvalResult:
    """`batch_losses` of a half-precision model computed in float32 (its weights upcast, exactly representable):
    what both half-precision paths approximate. Holds a float32 copy of the half tensors while it runs."""
    with _upcast(model):
        result = batch_losses(model, codes)
    if next(model.parameters()).is_cuda:  # hand the float32 copy's blocks back before streams and graphs allocate
        torch.cuda.empty_cache()
    return result
