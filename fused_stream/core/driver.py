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
from collections import deque
from collections.abc import Callable

import torch
from moshi.models.lm import LMModel

from ..kernels.cross_entropy import N_COUNTERS, check_backend
from ..measure.monitor import Monitor
from ..measure.preflight import available_bytes, check_fits, estimate_run_bytes, pick_batch_size
from ..measure.progress import Progress, mib
from ..measure.throughput import throughput_report
from .alignment import valid_masks
from .config import EvalConfig
from .graphs import graphs_wanted
from .inputs import batches_by_length, check_codes, pad_batch
from .result import EvalResult, empty_result, fill_rows
from .runner import StreamRunner
from .runtime import inference_mode
from .stream import enlarge_kv_caches, streaming_state_bytes

__all__ = ["EvalConfig", "StreamingEvaluator", "ConstantMemoryError", "enlarge_kv_caches", "streaming_state_bytes"]

log = logging.getLogger(__name__)

BatchFn = Callable[[list[int], EvalResult], None]  # (rows just filled, the result so far), after each batch


class ConstantMemoryError(AssertionError):
    """assert_constant_memory=True and memory grew with the frames processed."""


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

    def evaluate(self, codes: torch.Tensor | list[torch.Tensor], on_batch: BatchFn | None = None) -> EvalResult:
        """Losses for codes [B, K, T] or a list of [K, T_i]; each sequence's result equals evaluating it alone.

        `on_batch(rows, result)` is called after each batch with the rows it filled (to save them at once). An
        out-of-memory error halves the batch size and retries; a sequence that fails alone lands in `result.failed`.
        """
        model, cfg = self.model, self.config
        checked = check_codes(model, codes, cfg.invalid_tokens)
        lengths = [s.shape[1] for s in checked.sequences]
        preflight = self._preflight(lengths)
        queue = deque(batches_by_length(lengths, preflight["batch_size"]))
        frames_per_call = cfg.chunk_size * cfg.graph_unroll
        total_calls = sum(math.ceil(lengths[rows[0]] / frames_per_call) for rows in queue)
        result = empty_result(len(lengths), model.dep_q, max(lengths))
        result.n_masked_tokens = checked.n_masked_tokens
        log.info(
            "streaming %d sequences (%d frames, longest %d) on %s: B=%d, C=%d, graphs=%s; estimated %.2f GiB, "
            "%.2f GiB available (%s); context utilization %.2f",
            len(lengths), sum(lengths), max(lengths), self.device, preflight["batch_size"], cfg.chunk_size,
            cfg.cuda_graphs, preflight["estimate"]["run_bytes"] / 2**30, preflight["available_bytes"] / 2**30,
            preflight["available_source"], _context_utilization(model, lengths),
        )
        progress = Progress(cfg.progress, total_calls)
        runner = StreamRunner(model, cfg, self.loss_backend)
        counts = torch.zeros(N_COUNTERS, dtype=torch.long)
        monitor = Monitor(self.device, interval=cfg.monitor_interval)
        progress.monitor = monitor
        oom: list[dict] = []
        batches = 0
        start = time.perf_counter()
        try:
            with inference_mode(model), monitor:
                while queue:
                    rows = queue.popleft()
                    batch, batch_lengths = pad_batch(model, [checked.sequences[i] for i in rows])
                    try:
                        losses, text_losses, batch_counts = runner.run(batch, batch_lengths, progress, monitor)
                    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
                        runner.recover()
                        queue = _after_oom(rows, queue, error, result, oom)
                        continue
                    valid, text_valid = valid_masks(model, batch, batch_lengths)
                    fill_rows(result, rows, losses, text_losses, valid, text_valid, batch_lengths)
                    counts += batch_counts
                    batches += 1
                    if on_batch is not None:
                        on_batch(rows, result)
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
            batches=batches,
            out_of_memory=oom,  # each OOM: the batch size it hit and what happened next
            failed=dict(result.failed),
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
            **({"ttt": runner.tracker.report()} if runner.tracker is not None else {}),
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
            _steady(report["throughput"]), mib(memory.get("peak_bytes")), memory.get("memory_source"),
            memory.get("constant_memory"),
            graphs["reason"],
        )


def _after_oom(
    rows: list[int], queue: deque[list[int]], error: BaseException, result: EvalResult, oom: list[dict]
) -> deque[list[int]]:
    """Halve the batch size for this batch and the rest of the run; a single sequence that still fails is failed."""
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if len(rows) == 1:
        result.failed[rows[0]] = f"out of memory at batch size 1 ({message})"
        oom.append({"batch_size": 1, "action": "failed", "row": rows[0]})
        log.error("out of memory evaluating sequence %d alone: recorded as failed (%s)", rows[0], message)
        return queue
    size = len(rows) // 2
    remaining = rows + [row for batch in queue for row in batch]  # still longest first
    oom.append({"batch_size": len(rows), "action": f"retry at batch size {size}"})
    log.warning("out of memory at batch size %d (%s): retrying at %d", len(rows), message, size)
    return deque(remaining[i : i + size] for i in range(0, len(remaining), size))


def _context_utilization(model: LMModel, lengths: list[int]) -> float:
    """How much of the attention window the longest sequence fills (1.0 = it reaches past the context)."""
    return min(1.0, max(lengths) / model.context)


def _peak_increase(memory: dict) -> int | None:
    peak, baseline = memory.get("peak_bytes"), memory.get("baseline_bytes")
    return None if peak is None or baseline is None else peak - baseline


def _steady(throughput: dict) -> str:
    value = throughput.get("steady_frames_per_second")
    return "n/a" if value is None else f"{value:.1f}"
