"""The exact teacher-forced streaming driver: one frame (or an exact chunk of C frames) per step.

`evaluate()` checks the codes, sizes the batches against free memory (`preflight`), then for each batch: copies it
into a `stream.Stream` (static device buffers and the model's streaming state, allocated once per (B, C) shape
and reset in place), runs its steps — replays of a CUDA graph on GPU (`graphs`), eager calls elsewhere — and
copies the losses to the host once, after the batch's last step. A background `monitor.Monitor` samples memory
and the host-side frame count meanwhile; its verdict (constant memory) and throughput land in `result.report`.
Nothing in the step loop reads a device value on the host.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel

from .alignment import valid_masks
from .graphs import GRAPH_MODES, GraphedStep, GraphPool, graphs_wanted, verify_replay
from .inputs import INVALID_TOKEN_POLICIES, batches_by_length, check_codes, pad_batch
from .kernels.cross_entropy import N_COUNTERS, check_backend
from .monitor import Monitor
from .preflight import available_bytes, check_fits, estimate_run_bytes, pick_batch_size
from .result import EvalResult, empty_result, fill_rows
from .runtime import inference_mode
from .stream import Stream, enlarge_kv_caches, streaming_state_bytes
from .throughput import throughput_report

__all__ = ["EvalConfig", "StreamingEvaluator", "ConstantMemoryError", "enlarge_kv_caches", "streaming_state_bytes"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (calls done, total calls), called from the host-side step count


class ConstantMemoryError(AssertionError):
    """assert_constant_memory=True and memory grew with the frames processed."""


@dataclass
class EvalConfig:
    chunk_size: int = 1  # frames per step: 1 = frame mode (deployment semantics), C > 1 = exact chunk mode
    batch_size: int | str | None = None  # sequences per batch; None = all at once; "auto" = the most that fit
    device: str | None = None  # move the model there first; None = where the model is
    dtype: str | torch.dtype | None = None  # cast the model first ("bfloat16", torch.float32, ...); None = as is
    loss_backend: str = "auto"  # "auto" (Triton on CUDA, torch on CPU) | "torch" | "triton" (CPU: interpreter only)
    cuda_graphs: str = "auto"  # "auto" (on for CUDA) | "on" (capture failure raises) | "off"
    graph_unroll: int = 1  # steps per graph replay (batch lengths padded to a multiple of C * U, padding masked)
    verify_graph: int = 0  # N > 0: per new shape, N replays must equal N eager calls bit for bit
    invalid_tokens: str = "raise"  # "raise" a ValueError, or "mask" bad tokens and count them
    memory_limit: int | None = None  # bytes the run may use (default: free device memory / available RAM)
    assert_constant_memory: bool = False  # raise ConstantMemoryError when the monitor sees memory grow
    monitor_interval: float = 0.1  # seconds between memory samples
    progress: bool | ProgressFn = False  # tqdm bar, or a callback (calls done, total calls)

    def validate(self) -> None:
        if not _is_positive_int(self.chunk_size):
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if not (self.batch_size is None or self.batch_size == "auto" or _is_positive_int(self.batch_size)):
            raise ValueError(f"batch_size must be None, 'auto' or an int >= 1, got {self.batch_size!r}")
        self.torch_dtype()
        if self.loss_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"loss_backend must be 'auto', 'torch' or 'triton', got {self.loss_backend!r}")
        if self.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs must be one of {GRAPH_MODES}, got {self.cuda_graphs!r}")
        if not _is_positive_int(self.graph_unroll):
            raise ValueError(f"graph_unroll must be an int >= 1, got {self.graph_unroll!r}")
        if not (_is_positive_int(self.verify_graph) or self.verify_graph == 0) or isinstance(self.verify_graph, bool):
            raise ValueError(f"verify_graph must be an int >= 0, got {self.verify_graph!r}")
        if self.invalid_tokens not in INVALID_TOKEN_POLICIES:
            raise ValueError(f"invalid_tokens must be one of {INVALID_TOKEN_POLICIES}, got {self.invalid_tokens!r}")
        if self.memory_limit is not None and not _is_positive_int(self.memory_limit):
            raise ValueError(f"memory_limit must be None or a number of bytes >= 1, got {self.memory_limit!r}")
        if not (isinstance(self.monitor_interval, (int, float)) and self.monitor_interval > 0):
            raise ValueError(f"monitor_interval must be a number of seconds > 0, got {self.monitor_interval!r}")

    def torch_dtype(self) -> torch.dtype | None:
        """`dtype` as a torch.dtype (None = keep the model's)."""
        if self.dtype is None or isinstance(self.dtype, torch.dtype):
            return self.dtype
        dtype = getattr(torch, str(self.dtype), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as 'bfloat16', got {self.dtype!r}")
        return dtype


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class StreamingEvaluator:
    """Teacher-forced per-position losses of a moshi `LMModel`, streamed with constant memory.

    >>> result = StreamingEvaluator(model, EvalConfig(chunk_size=16)).evaluate(codes)  # codes [B, K, T]
    """

    def __init__(self, model: LMModel, config: EvalConfig | None = None) -> None:
        self.config = config or EvalConfig()
        self.config.validate()
        if model.fuser is not None or model.condition_provider is not None:
            raise ValueError("conditioned LMModels (fuser / condition_provider) are not supported")
        if model.dep_q < 1:
            raise ValueError("the model has no depformer (dep_q = 0): there are no audio losses to evaluate")
        if model.context is None:
            raise ValueError("the model has no attention context (context=None): streaming needs a finite one")
        dtype = self.config.torch_dtype()
        if self.config.device is not None or dtype is not None:
            model.to(device=self.config.device, dtype=dtype)
        self.model = model
        self.loss_backend = check_backend(self.config.loss_backend, self.device)
        graphs_wanted(self.config.cuda_graphs, self.device)  # cuda_graphs="on" off CUDA: a clear error, now

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def evaluate(self, codes: torch.Tensor | list[torch.Tensor]) -> EvalResult:
        """Losses for codes [B, K, T] or a list of [K, T_i]; each sequence's result equals evaluating it alone."""
        model, cfg = self.model, self.config
        checked = check_codes(model, codes, cfg.invalid_tokens)
        lengths = [s.shape[1] for s in checked.sequences]
        preflight = self._preflight(lengths)
        batches = batches_by_length(lengths, preflight["batch_size"])
        frames_per_call = cfg.chunk_size * cfg.graph_unroll
        total_calls = sum(math.ceil(lengths[rows[0]] / frames_per_call) for rows in batches)
        result = empty_result(len(lengths), model.dep_q, max(lengths))
        result.n_masked_tokens = checked.n_masked_tokens
        log.info(
            "streaming %d sequences (%d frames, longest %d) on %s: B=%d, C=%d, graphs=%s; estimated %.2f GiB, "
            "%.2f GiB available (%s); context utilization %.2f",
            len(lengths), sum(lengths), max(lengths), self.device, preflight["batch_size"], cfg.chunk_size,
            cfg.cuda_graphs, preflight["estimate"]["run_bytes"] / 2**30, preflight["available_bytes"] / 2**30,
            preflight["available_source"], _context_utilization(model, lengths),
        )
        progress = _Progress(cfg.progress, total_calls)
        runner = _StreamRunner(model, cfg, self.loss_backend)
        counts = torch.zeros(N_COUNTERS, dtype=torch.long)
        monitor = Monitor(self.device, interval=cfg.monitor_interval)
        progress.monitor = monitor
        start = time.perf_counter()
        try:
            with inference_mode(model), monitor:
                for rows in batches:
                    batch, batch_lengths = pad_batch(model, [checked.sequences[i] for i in rows])
                    losses, text_losses, batch_counts = runner.run(batch, batch_lengths, progress, monitor)
                    valid, text_valid = valid_masks(model, batch, batch_lengths)
                    fill_rows(result, rows, losses, text_losses, valid, text_valid, batch_lengths)
                    counts += batch_counts
        finally:
            progress.close()
            runner.close()
        elapsed = time.perf_counter() - start
        memory = monitor.report()
        preflight["measured_peak_increase_bytes"] = _peak_increase(memory)
        result.report.update(
            path="streaming",
            chunk_size=cfg.chunk_size,
            batch_size=preflight["batch_size"],
            loss_backend=self.loss_backend,
            batches=len(batches),
            steps=total_calls * cfg.graph_unroll,
            frames=sum(lengths),
            seconds=elapsed,
            frames_per_second=sum(lengths) / elapsed if elapsed > 0 else float("nan"),
            state_bytes=runner.max_state_bytes,
            scored_positions=int(counts[0]),  # counted on the device by the loss kernel
            nonfinite_logit_rows=int(counts[1]),
            bad_targets=int(counts[2]),
            context_utilization=_context_utilization(model, lengths),
            cuda_graphs=runner.graph_report(),
            memory=memory,
            constant_memory=memory.get("constant_memory"),
            preflight=preflight,
            throughput=throughput_report(model, cfg, preflight, memory, self.device, total_calls, elapsed),
        )
        self._log_done(result.report)
        if cfg.assert_constant_memory and memory.get("constant_memory") is False:
            raise ConstantMemoryError(
                f"memory grew by {memory['implied_growth_bytes'] / 2**20:.2f} MiB over the run "
                f"(tolerance {memory['tolerance_bytes'] / 2**20:.2f} MiB, {memory['memory_source']})"
            )
        return result

    def _preflight(self, lengths: list[int]) -> dict:
        """Resolve batch_size and check that the run fits, before anything is allocated."""
        cfg, model = self.config, self.model
        graphs = graphs_wanted(cfg.cuda_graphs, self.device)[0]  # the graph pool needs a margin
        available, source = available_bytes(self.device)
        if cfg.memory_limit is not None:
            available, source = min(available, cfg.memory_limit), f"memory_limit ({source})"
        frames = math.ceil(max(lengths) / (cfg.chunk_size * cfg.graph_unroll)) * cfg.chunk_size * cfg.graph_unroll
        if cfg.batch_size == "auto":
            batch_size = pick_batch_size(model, len(lengths), cfg.chunk_size, frames, available, cuda_graphs=graphs)
        else:
            batch_size = min(len(lengths), cfg.batch_size or len(lengths))
        estimate = estimate_run_bytes(model, batch_size, cfg.chunk_size, frames, cuda_graphs=graphs)
        check_fits(estimate, available, source)
        return {
            "batch_size": batch_size,
            "estimate": estimate.as_dict() | {"run_bytes": estimate.run_bytes, "total": estimate.total},
            "available_bytes": available,
            "available_source": source,
        }

    def _log_done(self, report: dict) -> None:
        memory, graphs = report["memory"], report["cuda_graphs"]
        log.info(
            "done: %d frames in %.1f s (%.1f frames/s, steady %s); peak memory %s (%s), constant memory: %s; "
            "graphs: %s",
            report["frames"], report["seconds"], report["frames_per_second"],
            _fmt(report["throughput"].get("steady_frames_per_second"), "{:.1f}"),
            _fmt(_mib(memory.get("peak_bytes")), "{:.1f} MiB"), memory.get("memory_source"),
            memory.get("constant_memory"),
            graphs["reason"],
        )


class _StreamRunner:
    """Holds the current Stream and its GraphedStep; re-opens (and re-captures) only when (B, capacity) changes."""

    def __init__(self, model: LMModel, config: EvalConfig, backend: str) -> None:
        self.model, self.config, self.backend = model, config, backend
        self.stream: Stream | None = None
        self.graphed: GraphedStep | None = None
        device = next(model.parameters()).device
        self.pool = GraphPool(device) if graphs_wanted(config.cuda_graphs, device)[0] else None  # one per run
        self.names = ["text"] + [f"audio codebook {k}" for k in range(model.dep_q)]
        self.opened = self.captures = 0
        self.capture_seconds = self.graphed_seconds = self.eager_seconds = 0.0
        self.verified_calls = 0
        self.max_state_bytes = 0
        self.reason = "no batch run"

    def run(
        self, batch: torch.Tensor, lengths: torch.Tensor, progress: _Progress, monitor: Monitor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stream one padded batch codes [B, K, T]; host tensors (audio [B, dep_q, T], text [B, 1, T], counts)."""
        B, _, T = batch.shape
        fresh = self.stream is None or not self.stream.fits(B, T)
        if fresh:
            self._open(B, T)
        stream = self.stream
        stream.load(batch.to(stream.losses.device), lengths)
        if fresh:
            self._capture(stream)
        graphed = self.graphed
        host_lengths = lengths.tolist()
        per_call = stream.frames_per_call
        start = time.perf_counter()
        for call in range(stream.n_calls):
            graphed.step()
            lo = call * per_call  # host arithmetic only: frames of this call inside each sequence
            monitor.add_frames(sum(min(max(n - lo, 0), per_call) for n in host_lengths))
            progress.advance()
        out = stream.host_losses(T)  # the batch's one host copy: waits for its last step
        seconds = time.perf_counter() - start
        if graphed.graphed:
            self.graphed_seconds += seconds
        else:
            self.eager_seconds += seconds
        return out

    def _open(self, batch_size: int, frames: int) -> None:
        self._close_stream()
        self.stream = Stream(self.model, batch_size, self.config.chunk_size, frames, self.backend,
                             unroll=self.config.graph_unroll)
        self.max_state_bytes = max(self.max_state_bytes, self.stream.state_bytes())
        self.opened += 1

    def _capture(self, stream: Stream) -> None:
        """Capture (needs the loaded batch for warm-up) and optionally verify replay against eager."""
        self.graphed = GraphedStep(stream, self.config.cuda_graphs, pool=self.pool)
        self.capture_seconds += self.graphed.capture_seconds
        self.captures += self.graphed.graphed
        self.reason = self.graphed.reason
        if self.config.verify_graph:
            self.verified_calls += verify_replay(self.graphed, self.config.verify_graph, self.names, stream.lead)
        log.debug("stream opened: B=%d, capacity %d, %s", stream.batch_size, stream.capacity, self.reason)

    def graph_report(self) -> dict:
        return {
            "setting": self.config.cuda_graphs,
            "graphed": self.opened > 0 and self.captures == self.opened,
            "reason": self.reason,
            "unroll": self.config.graph_unroll,
            "streams_opened": self.opened,
            "captures": self.captures,
            "capture_seconds": self.capture_seconds,
            "graphed_seconds": self.graphed_seconds,
            "eager_seconds": self.eager_seconds,
            "verified_calls": self.verified_calls,
        }

    def _close_stream(self) -> None:
        if self.graphed is not None:
            self.graphed.release()
        if self.stream is not None:
            self.stream.close()
        self.stream = self.graphed = None

    def close(self) -> None:
        """End of the run: the stream, then every graph of the run (see GraphPool)."""
        self._close_stream()
        if self.pool is not None:
            self.pool.close()


def _context_utilization(model: LMModel, lengths: list[int]) -> float:
    """How much of the attention window the longest sequence fills (1.0 = it reaches past the context)."""
    return min(1.0, max(lengths) / model.context)


def _peak_increase(memory: dict) -> int | None:
    peak, baseline = memory.get("peak_bytes"), memory.get("baseline_bytes")
    return None if peak is None or baseline is None else peak - baseline


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _fmt(value: object, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


class _Progress:
    """Host-side step counter driving a tqdm bar (with frames/s and memory from the monitor) or a callback.

    Never touches device values: frames and memory come from the monitor's host-side count and its sampler thread.
    """

    def __init__(self, progress: bool | ProgressFn, total: int) -> None:
        self.done, self.total = 0, total
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.monitor: Monitor | None = None
        self._shown = 0.0
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", desc="streaming")

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            now = time.perf_counter()
            if self.monitor is not None and now - self._shown > 0.5:  # a postfix per step would cost more than it shows
                self._shown = now
                frames, memory = self.monitor.latest()
                elapsed = self.bar.format_dict["elapsed"]
                rate = f"{frames / elapsed:,.0f} frames/s" if elapsed > 0 else ""
                self.bar.set_postfix_str(f"{rate}, mem {_fmt(_mib(memory), '{:,.0f} MiB')}", refresh=False)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
