"""The drop-in call for fine-tuning code: long-context loss of a model on a list of codes, in one function.

`evaluate_long_context_loss(model, codes_list)` lays each item out exactly as the CLI does (`core.inputs.layout_codes`),
streams it with `StreamingEvaluator` on the model *as it is* (no move, no cast: a training loop owns its model's
device and dtype) and returns the CLI's numbers: the flat `librilight_*` keys at the top level, plus the
per-position curves, the full metrics dict and the driver's report. Its options are `EvalConfig`'s, by name or as
a config, with EvalConfig's defaults: the call and the CLI cannot drift apart. Like every run, it first checks a
prefix of the data against the batch path (`LMModel.forward`) and raises `verify.parity.ParityError` on a mismatch
(`verify=False` skips that).

The model is handed back as it came: every module's train/eval flag, every parameter's `requires_grad`, out of
streaming mode, and every parameter, buffer and tensor attribute of the layers that are not moshi's (a TTT layer
writing its trainable weights while streaming) restored bit for bit from host copies (`core.restore`), whatever
happened inside (`preserved_model_state`). A model wrapped in DistributedDataParallel (or `torch.compile`) is
unwrapped; an FSDP model is refused with the way to evaluate it. With a process group initialised, every rank
evaluates its share of the sequences and the sums are added (`fused_stream.distributed`), as the CLI does under
torchrun: every rank must call, and every rank gets the metrics of the whole data.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel

from .core.config import ConfigError, EvalConfig
from .core.inputs import crop_frames, layout_codes
from .core.restore import ModelRestorer
from .data.dataset import assign_shards
from .distributed import World, all_reduce_sums, current_world, gather
from .engine.driver import StreamingEvaluator
from .metrics import TEXT, PositionSums, metrics_of
from .patches.streaming import is_streaming, stop_streaming
from .stats.analysis import flat_stderr
from .ttt.tracker import ttt_hooks

__all__ = ["check_config", "curves_as_lists", "evaluate_long_context_loss", "evaluate_share", "is_streaming",
           "prepare_codes", "preserved_model_state", "unwrap_model"]

log = logging.getLogger(__name__)

# Keys of the returned dict that are not flat metric keys (the flat keys all start with "librilight_").
PER_POSITION, METRICS, REPORT = "per_position", "metrics", "report"


def evaluate_long_context_loss(
    model: LMModel | torch.nn.Module, codes_list: Sequence[torch.Tensor], config: EvalConfig | None = None, *,
    distributed: bool | None = None, **options: Any
) -> dict[str, Any]:
    """Teacher-forced long-context metrics of `model` on `codes_list`, as `python -m fused_stream.eval` computes them.

    Each item is `[dep_q, T]` (or more) audio codes, laid out into the model's streams like the CLI's `--codes`
    (`text_fill`, `other_fill`), or a full `[K, T]` layout used as is; a leading batch dim of 1 is dropped; any
    device. `max_frames` crops every sequence after layout. The model runs where and in the dtype it is.

    `config` and `options` (EvalConfig field names, e.g. `chunk_size=16, window=100`; they override `config`)
    choose the evaluation; a name EvalConfig does not have raises TypeError, a bad value ConfigError.

    Verification is on by default (`verify=True`): while the run streams, a short prefix of up to two sequences
    (automatic, a few percent of the run's time; `verify_frames=N` for exactly N frames) is compared with
    `LMModel.forward` on that prefix. A model whose streaming path differs from its forward (e.g. a layer keeping
    state outside moshi's streaming state, or a TTT layer updating its fast weights only in `forward`) raises
    `fused_stream.ParityError` (an AssertionError naming the sequence, stream, frame, both values and a likely
    cause) before any metric is computed; the model is handed back as it came either way. `verify=False`
    skips the check (`report["verification"]` then says so).

    `distributed`: None (default) shares the sequences between the ranks of an initialised process group (every
    rank must call; each gets the whole data's metrics); False evaluates all of them here (a call from one rank).

    Returns a dict with:
    - the flat keys of `compute_metrics(...)["flat"]` (`librilight_loss_{n}k`, `librilight_loss_overall`,
      `librilight_slope*`, `librilight_samples`, `librilight_metrics_version`) at the top level, of the weighted
      loss when `codebook_weights` or `first_codebook_weight` is set; a key whose frames the data does not reach
      is absent, `librilight_loss_overall` is always there; with two or more sequences each loss and slope key has
      a `{key}_stderr` companion (a bootstrap over the sequences);
    - `"per_position"`: `position_means(...)` as plain Python lists of length T (JSON-ready): per stream
      (`codebook_{k}`, `text`), `combined`, `weighted` (with `codebook_weights`) as floats with None where no
      sequence is valid (never NaN), and `count` as ints;
    - `"metrics"`: the full `compute_metrics` dict (overall, windows, first_frames, slopes, flat, ...);
    - `"report"`: the driver's `result.report` (timings, memory verdict, preflight, CUDA graphs, and
      `"verification"`: what was compared with the batch path, the largest difference and what it cost).
    """
    model = unwrap_model(model)
    config = check_config(model, config, options)
    sequences = prepare_codes(model, codes_list, config)
    world = current_world() if distributed is not False else World()
    mine = assign_shards([s.shape[1] for s in sequences], [str(i) for i in range(len(sequences))],
                         world.size)[world.rank]
    return evaluate_share(model, [sequences[i] for i in mine], config, world, indices=mine)


def evaluate_share(model: LMModel, sequences: list[torch.Tensor], config: EvalConfig, world: World,
                   indices: list[int] | None = None) -> dict[str, Any]:
    """`evaluate_long_context_loss` of this rank's share `sequences` (laid out, maybe none; `indices`: their places
    in the whole data, default 0, 1, ...), the sums added over `world`'s ranks: what `compat` calls after each rank
    encoded only its own books. The bootstrap's units are put back in data order, so every world size resamples
    the same units the same way."""
    indices = list(range(len(sequences))) if indices is None else list(indices)
    error: Exception | None = None
    rows: list[tuple[int, PositionSums]] = []  # (data index, each sequence's own sums): the `_stderr` bootstrap's units
    try:
        with preserved_model_state(model):
            if sequences:
                result = StreamingEvaluator(model, config, hooks=ttt_hooks(model)).evaluate(sequences)
                sums, report = PositionSums.from_result(result), result.report
                rows = [(indices[i], PositionSums.from_result(result.row(i))) for i in range(len(sequences))
                        if i not in result.failed]
            else:  # more ranks than sequences
                sums, report = PositionSums.empty(_stream_names(model)), {"skipped": "no sequence for this rank"}
    except Exception as exc:  # every rank must learn that one failed, or the others wait in all_reduce forever
        if world.size == 1:
            raise
        error = exc
    if world.size > 1:
        _agree_on_failure(error, world)
        rows = [row for part in gather(rows, world) for row in part]
    rows.sort(key=lambda row: row[0])
    sums = all_reduce_sums(sums, world)
    weights = config.weights_for(model.dep_q)
    metrics, curves = metrics_of(sums, context=model.context, window=config.window, weights=weights)
    flat_stderr([row for _, row in rows], [str(i) for i, _ in rows], metrics,
                codebook_weights=weights)  # adds `{key}_stderr`
    return {
        **metrics["flat"],
        PER_POSITION: curves_as_lists(curves),
        METRICS: metrics,
        REPORT: report if world.size == 1 else {**report, "rank": world.rank, "world_size": world.size},
    }


def unwrap_model(model: torch.nn.Module) -> LMModel:
    """The moshi LMModel inside DistributedDataParallel / DataParallel / `torch.compile` wrappers; an FSDP model is
    refused (its parameters are sharded across ranks, and streaming needs each whole) with the way to call."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if _is_fsdp(model):
            raise TypeError(
                "the model is wrapped in FSDP: its parameters are sharded across ranks and streaming needs them "
                "whole. Gather them into an unwrapped model and evaluate that on every rank: full = "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                "full_state_dict=True, broadcast_from_rank0=False)); lm = <an LMModel built like the training one, "
                "e.g. moshi's get_moshi_lm>; lm.load_state_dict(full); evaluate(lm, ...)")
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    if not isinstance(model, LMModel):
        raise TypeError(f"expected a moshi LMModel (or one wrapped in DistributedDataParallel), got "
                        f"{type(model).__name__}")
    return model


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(model, (FullyShardedDataParallel, FSDPModule))


def _agree_on_failure(error: Exception | None, world: World) -> None:
    """Raise on every rank if any rank's evaluation failed: its own error where it failed."""
    import torch.distributed as dist

    device = f"cuda:{world.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"the evaluation failed on {int(failed)} other rank(s): see their error")


def _stream_names(model: LMModel) -> list[str]:
    return [f"codebook_{k}" for k in range(model.dep_q)] + [TEXT]


def check_config(model: LMModel, config: EvalConfig | None, options: dict[str, Any]) -> EvalConfig:
    """`config` with `options` applied, checked before the run, not after minutes of streaming."""
    names = [f.name for f in fields(EvalConfig)]
    for name in options:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (EvalConfig's options: {', '.join(names)})"
            raise TypeError(f"evaluate_long_context_loss() got an unknown option {name!r}{hint}")
    config = replace(config, **options) if config is not None else EvalConfig(**options)
    for name in ("device", "dtype"):  # the driver would move or cast a training loop's model
        if getattr(config, name) is not None:
            raise ConfigError(f"{name} must be None here: the model runs where and as it is (move or cast it first)")
    weights = config.codebook_weights
    if weights is not None and len(weights) != model.dep_q:  # first_codebook_weight fits any model
        raise ConfigError(f"codebook_weights needs one weight per audio codebook ({model.dep_q}), got {len(weights)}")
    return config


def prepare_codes(model: LMModel, codes_list: Sequence[torch.Tensor], config: EvalConfig) -> list[torch.Tensor]:
    """Every item as [K, T] int64 on the CPU in the model's layout, cropped: what the CLI hands the driver."""
    if isinstance(codes_list, torch.Tensor) and codes_list.dim() != 3:
        # A [B, n, T] tensor iterates as B items; anything else is not a list of sequences.
        raise ValueError(f"codes_list must be a sequence of [n, T] tensors, got a tensor {tuple(codes_list.shape)}")
    if len(codes_list) == 0:
        raise ValueError("codes_list is empty: nothing to evaluate")
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
        laid = layout_codes(model, codes.detach().cpu(), text_fill=config.text_fill, other_fill=config.other_fill,
                            source=f"codes_list[{i}]", invalid_tokens=config.invalid_tokens)
        out.append(crop_frames(laid, config.max_frames))
    return out


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
    """Snapshot every module's `training` flag, every parameter's `requires_grad` and (`core.restore`) the tensors
    of every layer that is not moshi's; restore them on exit, whether the body returns or raises.

    Why the flags, when the driver's `runtime.inference_mode` restores every module's flag too: it restores them
    as its loop found them, so a flag changed earlier in the call (by code around `evaluate`) stays changed; this
    snapshot is taken before anything runs. `requires_grad` only this restores. Also refuses a model already in
    streaming mode (the driver would hit moshi's bare assertion) and, on exit, leaves streaming mode if anything
    inside left the model in it (e.g. an exception between open and close).
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
        self.restorer = ModelRestorer(self.model)
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        stop_streaming(self.model)
        self.restorer.restore()
        if kind is None:  # a moshi weight written in place cannot be put back: say so (not over another error)
            self.restorer.check_untouched()
        for module, training in self.training:
            module.training = training  # the flag only: module.train() would recurse and overwrite children
        for param, flag in self.requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
