"""The drop-in call for fine-tuning code: long-context loss of a model on a list of codes, in one function.

`evaluate_long_context_loss(model, codes_list)` lays each item out exactly as the CLI does (`core.inputs.layout_codes`),
streams it with `StreamingEvaluator` on the model *as it is* (no move, no cast: a training loop owns its model's
device and dtype) and returns the CLI's numbers: the flat `librilight_*` keys at the top level, plus the
per-position curves, the full metrics dict and the driver's report.

The model is handed back as it came: every module's train/eval flag, every parameter's `requires_grad`, and out
of streaming mode. The driver's `runtime.inference_mode` only restores the *root* flag (`model.train(was)`
flattens per-module modes, e.g. a frozen encoder kept in eval inside a training model), so the per-module flags
and `requires_grad` are snapshotted here and put back in a `finally`, whatever happened inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule

from .core.config import EvalConfig
from .core.driver import StreamingEvaluator
from .core.inputs import layout_codes
from .data.audio import crop_frames
from .metrics import PositionSums, compute_metrics, position_means

__all__ = ["evaluate_long_context_loss", "curves_as_lists", "is_streaming", "preserved_model_state"]

# Keys of the returned dict that are not flat metric keys (the flat keys all start with "librilight_").
PER_POSITION, METRICS, REPORT = "per_position", "metrics", "report"


def evaluate_long_context_loss(
    model: LMModel,
    codes_list: Sequence[torch.Tensor],
    *,
    chunk_size: int = 1,
    batch_size: int | str | None = "auto",
    max_frames: int | None = None,
    codebook_weights: Sequence[float] | None = None,
    window: int = 1000,
    text_fill: str = "zero",
    other_fill: str = "zero",
    cuda_graphs: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Teacher-forced long-context metrics of `model` on `codes_list`, as `python -m fused_stream.eval` computes them.

    Each item is `[dep_q, T]` (or more) audio codes, laid out into the model's streams like the CLI's `--codes`
    (`text_fill`, `other_fill`), or a full `[K, T]` layout used as is; a leading batch dim of 1 is dropped; any
    device. `max_frames` crops every sequence after layout. The model runs where and in the dtype it is.

    Returns a dict with:
    - the flat keys of `compute_metrics(...)["flat"]` (`librilight_loss_{n}k`, `librilight_slope*`,
      `librilight_samples`) at the top level; a key whose frames the data does not reach is absent;
    - `"per_position"`: `position_means(...)` as plain Python lists of length T (JSON-ready): per stream
      (`codebook_{k}`, `text`), `combined`, `weighted` (with `codebook_weights`) as floats with None where no
      sequence is valid (never NaN), and `count` as ints;
    - `"metrics"`: the full `compute_metrics` dict (overall, windows, first_frames, slopes, flat, ...);
    - `"report"`: the driver's `result.report` (timings, memory verdict, preflight, CUDA graphs).
    """
    sequences = _prepare(model, codes_list, max_frames, text_fill, other_fill)
    _check_metric_args(model, window, codebook_weights)
    config = EvalConfig(chunk_size=chunk_size, batch_size=batch_size, cuda_graphs=cuda_graphs, progress=progress)
    with preserved_model_state(model):
        result = StreamingEvaluator(model, config).evaluate(sequences)
    sums = PositionSums.from_result(result)
    metrics = compute_metrics(sums, context=model.context, window=window, codebook_weights=codebook_weights)
    curves = position_means(sums, codebook_weights)
    return {
        **metrics["flat"],
        PER_POSITION: curves_as_lists(curves),
        METRICS: metrics,
        REPORT: result.report,
    }


def _prepare(
    model: LMModel, codes_list: Sequence[torch.Tensor], max_frames: int | None, text_fill: str, other_fill: str
) -> list[torch.Tensor]:
    """Every item as [K, T] int64 on the CPU in the model's layout, cropped: what the CLI hands the driver."""
    if isinstance(codes_list, torch.Tensor) and codes_list.dim() != 3:
        # A [B, n, T] tensor iterates as B items; anything else is not a list of sequences.
        raise ValueError(f"codes_list must be a sequence of [n, T] tensors, got a tensor {tuple(codes_list.shape)}")
    if len(codes_list) == 0:
        raise ValueError("codes_list is empty: nothing to evaluate")
    if max_frames is not None and not (isinstance(max_frames, int) and not isinstance(max_frames, bool)
                                       and max_frames >= 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    out = []
    for i, codes in enumerate(codes_list):
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes_list[{i}] must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dim() == 3 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.dim() != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes_list[{i}] has shape {tuple(codes.shape)}: expected [n_codebooks, T] "
                             f"(or [1, n_codebooks, T]) with T >= 1")
        # The CPU, like the CLI's loaded files: layout and checks are host work, the driver moves each batch once.
        laid = layout_codes(model, codes.detach().cpu(), text_fill=text_fill, other_fill=other_fill,
                            source=f"codes_list[{i}]")
        out.append(crop_frames(laid, max_frames))
    return out


def _check_metric_args(model: LMModel, window: int, codebook_weights: Sequence[float] | None) -> None:
    """Fail before the run, not after minutes of streaming, on arguments only the metrics read."""
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"window must be an int >= 1 (frames), got {window!r}")
    if codebook_weights is not None and len(list(codebook_weights)) != model.dep_q:
        raise ValueError(f"codebook_weights needs one weight per audio codebook ({model.dep_q}), "
                         f"got {len(list(codebook_weights))}")


def curves_as_lists(curves: dict[str, np.ndarray]) -> dict[str, list]:
    """`position_means` curves as JSON-ready lists: floats with None for NaN, `count` as ints."""
    out: dict[str, list] = {}
    for name, curve in curves.items():
        if name == "count":
            out[name] = [int(v) for v in np.asarray(curve).tolist()]
        else:
            out[name] = [None if math.isnan(v) else float(v) for v in np.asarray(curve, dtype=np.float64).tolist()]
    return out


class preserved_model_state:  # noqa: N801 - used as a context manager, named like one
    """Snapshot every module's `training` flag and every parameter's `requires_grad`; restore them on exit.

    Also refuses a model already in streaming mode (the driver would hit moshi's bare assertion) and, on exit,
    leaves streaming mode if anything inside left the model in it (e.g. an exception between open and close).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.training: list[tuple[torch.nn.Module, bool]] = []
        self.requires_grad: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> preserved_model_state:
        if is_streaming(self.model):
            raise ValueError("the model is in streaming mode (inside model.streaming() or after streaming_forever()): "
                             "leave it before evaluating")
        self.training = [(m, m.training) for m in self.model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        return self

    def __exit__(self, *exc: object) -> None:
        if is_streaming(self.model) and isinstance(self.model, StreamingModule):
            self.model._stop_streaming()
        for module, training in self.training:
            module.training = training  # the flag only: module.train() would recurse and overwrite children
        for param, flag in self.requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def is_streaming(model: torch.nn.Module) -> bool:
    """Whether any streaming module of `model` holds a streaming state."""
    return any(isinstance(m, StreamingModule) and m._streaming_state is not None for m in model.modules())
