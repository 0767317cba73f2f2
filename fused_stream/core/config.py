"""`EvalConfig`: every option of an evaluation, its default and its allowed values, declared once.

Who reads what: the driver reads the run options (chunk and batch size, loss backend, CUDA graphs, memory,
verification); `layout_codes` and the croppers read `max_frames`, `text_fill` and `other_fill` (the API and the CLI
lay codes out before the driver sees them); `metrics` reads `window` and `codebook_weights`. The CLI builds its
evaluation options from these fields (`metadata`: help text and how to parse the command line), the drop-in API
passes its keyword arguments through, and the finetune-config reader maps its keys onto these names; none of them
repeats a default.
Choice lists belong to the code that consumes them and are only imported here (the graph modes are declared
here: the plan resolves them).

`Plan` is the resolved form the rest of a run reads: device, dtype, loss backend and graph mode, decided once when
the evaluator is built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..errors import FusedStreamError
from ..kernels.backends import LOSS_BACKENDS, backends_help, resolve_backend
from .inputs import INVALID_TOKEN_POLICIES, OTHER_FILLS, TEXT_FILLS


class ConfigError(FusedStreamError, ValueError):
    """A bad option value, from any source (keyword, config file, command line): the message names the option."""


def _int_or_auto(name: str) -> Callable[[str], int | str]:
    """The command line's and a config file's spelling of option `name`: an integer or "auto"."""

    def parse(text: str) -> int | str:
        if str(text) == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name} must be an integer >= 1 or 'auto', got {text!r}") from None

    parse.__name__ = f"parse_{name}"
    return parse


parse_batch_size = _int_or_auto("batch_size")
parse_chunk_size = _int_or_auto("chunk_size")


def parse_weights(text: str) -> list[float]:
    """`100,1,1,1,1,1,1,1` -> a list of codebook weights."""
    try:
        return [float(w) for w in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"codebook_weights must be comma-separated numbers, got {text!r}") from None


# CUDA graphs: the modes of EvalConfig.cuda_graphs, and the environment switch that turns them off.
GRAPH_MODES = ("auto", "on", "off", "rehearse")
DISABLE_ENV = "FUSED_STREAM_NO_CUDA_GRAPH"

def graphs_wanted(setting: str, device: torch.device) -> tuple[bool, str]:
    """Whether to capture (or rehearse capturing), and why (the reason lands in the report): `setting` is one of
    GRAPH_MODES; "rehearse" works on any device."""
    if setting not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {GRAPH_MODES}, got {setting!r}")
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if setting == "off":
        return False, "cuda_graphs='off'"
    if setting == "rehearse":
        return True, f"rehearsed on {device.type}"
    if device.type != "cuda":
        if setting == "on":
            raise ValueError(f"cuda_graphs='on' needs a CUDA device; the model is on {device}")
        return False, f"device is {device.type}"
    return True, "captured"


def _option(default: Any, help: str, *, cli: bool = True, parse: Callable[[str], Any] | None = None,
            choices: Sequence[str] | None = None) -> Any:
    """A field with its command-line description: `cli=False` keeps it out of `python -m fused_stream.eval`."""
    return field(default=default, metadata={"help": help, "cli": cli, "parse": parse, "choices": choices})


@dataclass
class EvalConfig:
    # --- the run (read by the driver)
    # "auto": resolved by the driver once the lengths are known (plan/chunk_choice.py).
    chunk_size: int | str = _option(1, "frames per step: 1 = frame mode, the deployment semantics (default); C > 1 "
                                       "= exact chunk mode, faster; auto = chunk mode with the C that is fastest "
                                       "and fits in memory (at most 256, or the longest sequence)",
                                    parse=parse_chunk_size)
    # None (Python only): all sequences at once.
    batch_size: int | str | None = _option("auto", "sequences per batch, or auto (default): the most that fit in "
                                                   "free memory", parse=parse_batch_size)
    loss_backend: str = _option("auto", backends_help(), choices=LOSS_BACKENDS)  # from kernels/backends' records
    cuda_graphs: str = _option("auto", "auto (on CUDA), on (fail if capture fails), off, rehearse (any device: the "
                                       "capture/replay control flow with eager calls, checking what a real capture "
                                       "needs; fails like on)", choices=GRAPH_MODES)
    graph_unroll: int = _option(1, "steps per graph replay (lengths padded to a multiple of C * U, padding masked)",
                                cli=False)
    verify_graph: int = _option(0, "N > 0: per new shape, N replays must equal N eager calls bit for bit", cli=False)
    invalid_tokens: str = _option("raise", "a token outside the model's vocabulary: raise (default; with files, the "
                                           "file is recorded as failed) or mask (never scored, counted)",
                                  choices=INVALID_TOKEN_POLICIES)
    memory_limit: int | None = _option(None, "bytes the run may use (default: free device memory / available RAM)",
                                       cli=False)
    assert_constant_memory: bool = _option(False, "fail when the memory monitor sees memory grow with frames")
    verify: bool = _option(True, "check a prefix of the data against the batch path (LMModel.forward) before the "
                                 "run goes on; a mismatch stops the run (--no-verify skips it)")
    # None: automatic, a prefix costing < 5% of the run (verify.verification.verification_prefix).
    verify_frames: int | None = _option(None, "frames of each verified sequence (default: automatic, a few percent "
                                              "of the run; N: min(N, the sequence's length), at least one "
                                              "compared frame)", parse=int)
    # Read only with a store to save into (`evaluate(..., checkpoints=)`; the CLI's OUT/partial): engine/checkpoint.py.
    checkpoint_every: float = _option(300.0, "seconds of streaming between two saves of the batch in progress "
                                             "(its whole streaming state), so that an interrupt or a crash loses at "
                                             "most that much (default 300; at least 10x the time a save takes; 0: "
                                             "after every call; inf: only whole batches)", parse=float)
    monitor_interval: float = _option(0.1, "seconds between memory samples", cli=False)
    progress: Any = _option(False, "a tqdm bar (True) or a callback (calls done, total calls)", cli=False)
    device: str | None = _option(None, "move the model there first (None: where it is)", cli=False)
    dtype: str | torch.dtype | None = _option(None, "cast the model first, e.g. 'bfloat16' (None: as it is)",
                                              cli=False)
    # --- the codes (read where they are laid out, before the driver)
    max_frames: int | None = _option(None, "crop every sequence to its first N frames", parse=int)
    text_fill: str = _option("zero", "text stream for audio-only codes: zero (the zero token -1, never scored; "
                                     "default) or pad (the model's text padding id, scored as text)",
                             choices=TEXT_FILLS)
    other_fill: str = _option("zero", "the user's audio streams for audio-only codes: zero (default) or copy (the "
                                      "same codes)", choices=OTHER_FILLS)
    # --- the metrics (read by `metrics`)
    window: int = _option(1000, "window of the window means and flat keys, in frames (default 1000)", parse=int)
    codebook_weights: list[float] | None = _option(
        None, "also report a weighted combined loss, e.g. 100,1,1,1,1,1,1,1 (moshi-finetune's weighting)",
        parse=parse_weights)
    first_codebook_weight: float | None = _option(
        None, "weight of audio codebook 0, the others 1: moshi-finetune's first_codebook_weight_multiplier (e.g. "
              "100); the same as codebook_weights W,1,...,1", parse=float)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first option whose value is not allowed."""
        for name in ("graph_unroll", "window"):
            _require(_is_count(getattr(self, name)), name, "an int >= 1", getattr(self, name))
        _require(self.chunk_size == "auto" or _is_count(self.chunk_size), "chunk_size", "an int >= 1 or 'auto'",
                 self.chunk_size)
        for name in ("max_frames", "memory_limit", "verify_frames"):
            value = getattr(self, name)
            _require(value is None or _is_count(value), name, "None or an int >= 1", value)
        _require(self.batch_size in (None, "auto") or _is_count(self.batch_size), "batch_size",
                 "'auto', None or an int >= 1", self.batch_size)
        _require(isinstance(self.verify, bool), "verify", "true or false", self.verify)
        _require(_is_count(self.verify_graph) or self.verify_graph == 0 and not isinstance(self.verify_graph, bool),
                 "verify_graph", "an int >= 0", self.verify_graph)
        for f in fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None:
                _require(value in choices, f.name, f"one of {', '.join(choices)}", value)
        every = self.checkpoint_every
        _require(isinstance(every, (int, float)) and not isinstance(every, bool) and every >= 0, "checkpoint_every",
                 "a number of seconds >= 0", every)
        _require(isinstance(self.monitor_interval, (int, float)) and self.monitor_interval > 0, "monitor_interval",
                 "a number of seconds > 0", self.monitor_interval)
        weights = self.codebook_weights
        if weights is not None:
            ok = (isinstance(weights, Sequence)
                  and all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
                  and any(w > 0 for w in weights))
            _require(ok, "codebook_weights", "finite numbers >= 0 with at least one > 0", weights)
        first = self.first_codebook_weight
        _require(first is None or (isinstance(first, (int, float)) and not isinstance(first, bool)
                                   and math.isfinite(first) and first > 0),
                 "first_codebook_weight", "a finite number > 0", first)
        _require(first is None or weights is None, "first_codebook_weight",
                 "unset when codebook_weights is given (both set the weighting)", first)
        self.torch_dtype()

    def weights_for(self, n_audio: int) -> list[float] | None:
        """The codebook weights of a model with `n_audio` audio codebooks (None: unweighted): `codebook_weights`, or
        `first_codebook_weight` for codebook 0 and 1 for the others."""
        if self.first_codebook_weight is not None:
            return [float(self.first_codebook_weight)] + [1.0] * (n_audio - 1)
        return None if self.codebook_weights is None else list(self.codebook_weights)

    def torch_dtype(self) -> torch.dtype | None:
        """`dtype` as a torch.dtype (None = keep the model's)."""
        if self.dtype is None or isinstance(self.dtype, torch.dtype):
            return self.dtype
        dtype = getattr(torch, str(self.dtype), None)
        _require(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "dtype",
                 "a floating torch dtype such as 'bfloat16'", self.dtype)
        return dtype


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require(ok: bool, name: str, what: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """What a run does, resolved once from the config and the model's device; everything after reads only this."""

    device: torch.device
    loss_backend: str  # a registered loss backend's name (kernels/backends), never "auto"
    graphs: bool  # capture CUDA graphs (or rehearse capturing them)
    strict_graphs: bool  # cuda_graphs="on" or "rehearse": a capture that fails raises instead of running eagerly
    graph_reason: str  # why graphs are on or off, for the report
    chunk_size: int  # chunk_size="auto": 1 until the driver resolves it for the run's lengths
    unroll: int
    rehearse: bool = False  # cuda_graphs="rehearse": eager calls where capture and replay would be, checked

    @property
    def frames_per_call(self) -> int:
        """Frames of one sequence covered by one call of the captured unit (U steps of C frames)."""
        return self.chunk_size * self.unroll


def make_plan(config: EvalConfig, device: torch.device) -> Plan:
    """Resolve `config` for a model on `device`: raises now (not after a model ran) if the two do not go together."""
    graphs, reason = graphs_wanted(config.cuda_graphs, device)
    return Plan(device=device, loss_backend=resolve_backend(config.loss_backend, device), graphs=graphs,
                strict_graphs=config.cuda_graphs in ("on", "rehearse"), graph_reason=reason,
                chunk_size=1 if config.chunk_size == "auto" else config.chunk_size, unroll=config.graph_unroll,
                rehearse=graphs and config.cuda_graphs == "rehearse")
