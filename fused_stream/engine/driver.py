"""The exact teacher-forced streaming driver: one frame (or an exact chunk of C frames) per step.

`evaluate()` checks the codes, sizes the batches against free memory (`preflight`), computes the batch-path reference
of short prefixes of up to two sequences (`verify/verification.py`, on by default), then for each batch: copies it into
a `Stream` (static device buffers and the model's streaming state, allocated once per (B, capacity) and reset in
place; reused while batches keep that shape), runs its calls — replays of a CUDA graph on GPU (`RingSteps`: one
`CUDAGraphed` per fill bucket of the ring), eager calls elsewhere (`cuda_graphs="rehearse"`: eager calls through the
same capture/replay control flow, checked as a replay would need) — and copies the losses to the host once, after the
batch's last call. Each batch holding a verified sequence (at most two per run) pauses once, after the calls that
cover its prefix, to compare it: a mismatch raises `ParityError`. An out-of-memory error frees the stream and its
graphs, halves the batch size and retries. A background `Monitor` samples memory and the host-side frame count
meanwhile; its verdict (constant memory) and throughput land in `result.report`. Nothing in the step loop reads a
device value on the host, but those (at most two) verification copies per run.

What the driver does not know about: TTT layers, or anything else that wants to watch each batch, come in as
`hooks` (`begin_batch()` after a batch is loaded, `end_batch()` after its last call, `report()` at the end, put
in the run's report under the hook's name).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from moshi.models.lm import LMModel

from ..core.alignment import valid_masks
from ..core.config import ConfigError, EvalConfig, Plan, make_plan
from ..core.inputs import batches_by_length, check_codes, pad_batch
from ..core.result import EvalResult, empty_result, fill_rows
from ..core.runtime import inference_mode
from ..errors import FusedStreamError
from ..kernels.cross_entropy import N_COUNTERS
from ..measure.monitor import Monitor
from ..measure.progress import Progress, mib
from ..measure.throughput import format_throughput, throughput_report
from ..patches.foreign import chunk_refusal
from ..plan.chunk_choice import resolve_chunk_size
from ..plan.preflight import available_bytes, check_fits, estimate_run_bytes, pick_batch_size
from ..verify.verification import Verification
from .checkpoint import Checkpointer, StreamCheckpoints, continue_saved, saved_batch_first, sequence_digest
from .stream import RunStreams

__all__ = ["BatchHook", "ConstantMemoryError", "StreamingEvaluator"]

log = logging.getLogger(__name__)

BatchFn = Callable[[list[int], EvalResult], None]  # (rows just filled, the result so far), after each batch


class BatchHook(Protocol):
    """Watches each batch of a run from outside the driver (e.g. `ttt.tracker.TTTTracker`); device work only."""

    def begin_batch(self) -> None: ...  # the batch is loaded and the streaming state reset

    def end_batch(self) -> None: ...  # after the batch's last call, before the next batch is loaded

    def report(self) -> dict: ...  # at the end of the run: the one host copy


class ConstantMemoryError(FusedStreamError, AssertionError):
    """assert_constant_memory=True and memory grew with the frames processed."""


def unstreamable(model: LMModel) -> str | None:
    """Why this evaluator cannot stream `model` at all, or None. Read from its structure only, so the CLI asks it of
    the model a config builds on the meta device, before any weight loads."""
    if model.fuser is not None or model.condition_provider is not None:
        return "conditioned LMModels (fuser / condition_provider) are not supported"
    if model.dep_q < 1:
        return "the model has no depformer (dep_q = 0): there are no audio losses to evaluate"
    if model.context is None:
        return "the model has no attention context (context=None): streaming needs a finite one"
    return None


class StreamingEvaluator:
    """Teacher-forced per-position losses of a moshi `LMModel`, streamed with constant memory.

    >>> result = StreamingEvaluator(model, EvalConfig(chunk_size=16)).evaluate(codes)  # codes [B, K, T]
    """

    def __init__(
        self, model: LMModel, config: EvalConfig | None = None, *, hooks: Mapping[str, BatchHook] | None = None
    ) -> None:
        self.config = config or EvalConfig()
        self.config.validate()  # a config mutated after construction
        refusal = unstreamable(model)
        if refusal is not None:
            raise ConfigError(refusal)
        dtype = self.config.torch_dtype()
        if self.config.device is not None or dtype is not None:
            model.to(device=self.config.device, dtype=dtype)
        self.model = model
        self.hooks = dict(hooks or {})
        self.interrupted_report: dict | None = None  # set when an interrupt stops `evaluate`: what it measured
        self.plan: Plan = make_plan(self.config, self.device)  # cuda_graphs="on" off CUDA: a clear error, now
        # Chunks are exact for moshi's layers; a layer the package does not know may update its state per frame.
        self.chunk_refusal = chunk_refusal(model)
        if self.chunk_refusal and self.config.chunk_size not in (1, "auto"):
            raise ConfigError(f"chunk_size={self.config.chunk_size} is refused: {self.chunk_refusal}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def evaluate(
        self, codes: torch.Tensor | list[torch.Tensor], on_batch: BatchFn | None = None,
        checkpoints: StreamCheckpoints | None = None,
    ) -> EvalResult:
        """Losses for codes [B, K, T] or a list of [K, T_i]; each sequence's result equals evaluating it alone.

        `on_batch(rows, result)` is called after each batch with the rows it filled (to save them at once). An
        out-of-memory error halves the batch size and retries; a sequence that fails alone lands in `result.failed`.
        With `verify` (the default), a prefix of the first batch's first sequences is checked against the batch path
        while it streams: a mismatch raises `verify.parity.ParityError` before `on_batch` sees that batch.
        `checkpoints` (`engine.checkpoint`): the batch in progress is saved there every `checkpoint_every` seconds,
        and a state saved by an earlier run for some of these sequences is continued first, from where it stopped.
        """
        model, cfg = self.model, self.config
        checked = check_codes(model, codes, cfg.invalid_tokens)
        lengths = [s.shape[1] for s in checked.sequences]
        preflight = self._preflight(lengths)
        plan = self.plan  # chunk_size="auto" is resolved now, for these lengths
        queue = deque(batches_by_length(lengths, preflight["batch_size"]))
        digests, resume = None, None
        if checkpoints is not None:
            digests = [sequence_digest(s) for s in checked.sequences]
            queue, resume = saved_batch_first(checkpoints, digests, lengths, queue, preflight["batch_size"])
        saver = Checkpointer(checkpoints, cfg.checkpoint_every) if checkpoints is not None else None
        total_calls = sum(math.ceil(lengths[rows[0]] / plan.frames_per_call) for rows in queue)
        resumed_calls = resume["calls_done"] if resume is not None else 0
        resumed_frames = sum(min(lengths[i], resume["frames_done"]) for i in queue[0]) if resume is not None else 0
        result = empty_result(len(lengths), model.dep_q, max(lengths))
        result.n_masked_tokens = checked.n_masked_tokens
        log.info(
            "streaming %d sequences (%d frames, longest %d) on %s: B=%d, C=%d, graphs=%s; estimated %.2f GiB, "
            "%.2f GiB available (%s); context utilization %.2f",
            len(lengths), sum(lengths), max(lengths), self.device, preflight["batch_size"], plan.chunk_size,
            plan.graphs, preflight["estimate"]["run_bytes"] / 2**30, preflight["available_bytes"] / 2**30,
            preflight["available_source"], _context_utilization(model, lengths),
        )
        progress = Progress(cfg.progress, total_calls - resumed_calls)
        streams = RunStreams(model, plan, cfg.verify_graph)
        counts = torch.zeros(N_COUNTERS, dtype=torch.long)
        monitor = Monitor(self.device, interval=cfg.monitor_interval)
        progress.monitor = monitor
        oom: list[dict] = []
        batches = 0
        verification = None
        self.interrupted_report = None
        start = time.perf_counter()
        try:
            # Before any Stream opens: a moshi module inside streaming() cannot run the reference's plain forward.
            verification = (Verification(model, checked.sequences, list(queue), plan.frames_per_call, cfg.verify_frames)
                            if cfg.verify else None)
            with inference_mode(model), monitor:
                while queue:
                    rows = queue.popleft()
                    batch, batch_lengths = pad_batch(model, [checked.sequences[i] for i in rows])
                    saved, resume = resume, None  # a saved state continues its batch's first attempt only
                    try:
                        losses, text_losses, batch_counts = self._run_batch(
                            streams, rows, batch, batch_lengths, progress, monitor, verification, saved, saver,
                            None if digests is None else [digests[i] for i in rows])
                    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
                        out_of_memory = _oom_message(error)
                    else:
                        out_of_memory = None
                    if out_of_memory is not None:
                        # Outside the except block: its traceback held the failed step's frames (the stream, the
                        # graphs, their tensors) until now, so freeing them inside it would free nothing.
                        streams.recover()
                        queue = _after_oom(rows, queue, out_of_memory, result, oom)
                        continue
                    valid, text_valid = valid_masks(model, batch, batch_lengths)
                    fill_rows(result, rows, losses, text_losses, valid, text_valid, batch_lengths)
                    counts += batch_counts
                    batches += 1
                    if on_batch is not None:
                        on_batch(rows, result)
                    if checkpoints is not None:  # the batch is saved whole now: its mid-stream state is obsolete
                        checkpoints.clear_stream()
        except Exception:
            raise
        except BaseException:  # an interrupt: what this run measured until now, for the caller to keep
            elapsed = time.perf_counter() - start
            try:
                self.interrupted_report = {
                    "interrupted": True, "seconds": elapsed, "batches": batches,
                    "frames_streamed": monitor.latest()[0], "memory": monitor.report(),
                    "cuda_graphs": streams.report(cfg.cuda_graphs),
                    "verification": verification.report(elapsed) if verification else None,
                    "checkpoints": saver.report() if saver is not None else None, "out_of_memory": oom,
                }
            except Exception as exc:  # noqa: BLE001 - a report must never replace the interrupt being raised
                self.interrupted_report = {"interrupted": True, "report_error": f"{type(exc).__name__}: {exc}"}
            raise
        finally:
            progress.close()
            streams.close()
        elapsed = time.perf_counter() - start
        memory = monitor.report()
        preflight["measured_peak_increase_bytes"] = _peak_increase(memory)
        result.report.update(
            path="streaming",
            chunk_size=plan.chunk_size,
            chunk_choice=preflight["chunk_choice"],
            batch_size=preflight["batch_size"],
            loss_backend=plan.loss_backend,
            batches=batches,
            out_of_memory=oom,  # each OOM: the batch size it hit and what happened next
            failed=dict(result.failed),
            steps=(total_calls - resumed_calls) * plan.unroll,
            resumed_calls=resumed_calls,  # calls of a batch an earlier run saved mid-stream, not streamed again
            checkpoints=saver.report() if saver is not None else {"skipped": "no checkpoint store"},
            frames=sum(lengths),
            seconds=elapsed,
            resumed_frames=resumed_frames,
            frames_per_second=(sum(lengths) - resumed_frames) / elapsed if elapsed > 0 else float("nan"),
            state_bytes=streams.max_state_bytes,
            scored_positions=int(counts[0]),  # counted on the device by the loss kernel
            nonfinite_logit_rows=int(counts[1]),
            bad_targets=int(counts[2]),
            context_utilization=_context_utilization(model, lengths),
            cuda_graphs=streams.report(cfg.cuda_graphs),
            patches=streams.patches,  # per patch of moshi's code: installed, or why not (patches/patch_probe.py)
            verification=verification.report(elapsed) if verification else {"skipped": "verify=False"},
            **{name: hook.report() for name, hook in self.hooks.items()},
            memory=memory,
            constant_memory=memory.get("constant_memory"),
            preflight=preflight,
            throughput=throughput_report(model, plan.chunk_size, preflight, memory, self.device,
                                         (total_calls - resumed_calls) * plan.unroll, elapsed,
                                         kv_read_fraction=streams.kv_read_fraction()),
        )
        self._log_done(result.report)
        if cfg.assert_constant_memory and memory.get("constant_memory") is False:
            raise ConstantMemoryError(
                f"memory grew by {memory['implied_growth_bytes'] / 2**20:.2f} MiB over the run "
                f"(tolerance {memory['tolerance_bytes'] / 2**20:.2f} MiB, {memory['memory_source']})"
            )
        return result

    def _run_batch(
        self, streams: RunStreams, rows: list[int], batch: torch.Tensor, lengths: torch.Tensor, progress: Progress,
        monitor: Monitor, verification: Verification | None, saved: dict | None = None,
        saver: Checkpointer | None = None, digests: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stream one padded batch codes [B, K, T] (sequences `rows`); host tensors (audio [B, dep_q, T], text
        [B, 1, T], counts). Raises ParityError when a verified prefix in it differs from the batch path.
        `saved`: this batch's state from an earlier run, continued; `saver`: saves it every so often."""
        stream, step = streams.load(batch, lengths)
        check_at = verification.pause_after(rows, stream.frames_per_call) if verification else None
        for hook in self.hooks.values():
            hook.begin_batch()  # after load/capture: the streaming state is at its reset values
        first = continue_saved(stream, saved)
        if check_at is not None and check_at <= first:  # its prefix streamed before the save: compare it now
            verification.check(stream, rows, batch, lengths)
        if saver is not None:
            saver.start_batch()
        host_lengths = lengths.tolist()  # a host tensor: no sync
        per_call = stream.frames_per_call
        start = time.perf_counter()
        for call in range(first, stream.n_calls):
            step()
            lo = call * per_call  # host arithmetic only: frames of this call inside each sequence
            monitor.add_frames(sum(min(max(n - lo, 0), per_call) for n in host_lengths))
            progress.advance()
            if call + 1 == check_at:
                verification.check(stream, rows, batch, lengths)
            if saver is not None and call + 1 < stream.n_calls and saver.due():  # between calls: a host copy
                saver.save(stream, digests)
        for hook in self.hooks.values():
            hook.end_batch()
        out = stream.host_losses(batch.shape[-1])  # the batch's one host copy: waits for its last call
        streams.add_time(step.graphed, time.perf_counter() - start)
        return out

    def _preflight(self, lengths: list[int]) -> dict:
        """Resolve chunk_size (into self.plan) and batch_size and check that the run fits, before anything is
        allocated."""
        cfg, model = self.config, self.model
        available, source = available_bytes(self.device)
        if cfg.memory_limit is not None:
            available, source = min(available, cfg.memory_limit), f"memory_limit ({source})"
        if cfg.chunk_size == "auto" and self.chunk_refusal:
            chunk, why = 1, f"frame mode (chunk_size=auto would be inexact): {self.chunk_refusal}"
            log.warning("chunk_size=auto: %s", why)
        else:
            chunk, why = resolve_chunk_size(cfg.chunk_size, model, max(lengths), len(lengths), cfg.batch_size,
                                            available, source, unroll=self.plan.unroll, cuda_graphs=self.plan.graphs,
                                            loss_backend=self.plan.loss_backend)
        self.plan = plan = dataclasses.replace(self.plan, chunk_size=chunk)
        frames = math.ceil(max(lengths) / plan.frames_per_call) * plan.frames_per_call
        if cfg.batch_size == "auto":
            batch_size = pick_batch_size(model, len(lengths), plan.chunk_size, frames, available,
                                         cuda_graphs=plan.graphs, loss_backend=plan.loss_backend)
        else:
            batch_size = min(len(lengths), cfg.batch_size or len(lengths))
        estimate = estimate_run_bytes(model, batch_size, plan.chunk_size, frames, cuda_graphs=plan.graphs,
                                      loss_backend=plan.loss_backend)
        check_fits(estimate, available, source)
        return {
            "batch_size": batch_size,
            "chunk_size": chunk,
            "chunk_choice": why,
            "estimate": estimate.as_dict() | {"run_bytes": estimate.run_bytes, "total": estimate.total},
            "available_bytes": available,
            "available_source": source,
        }

    def _log_done(self, report: dict) -> None:
        memory, graphs = report["memory"], report["cuda_graphs"]
        log.info(
            "done: %d frames in %.1f s (%s); peak memory %s (%s), constant memory: %s; graphs: %s",
            report["frames"], report["seconds"], format_throughput(report["throughput"]),
            mib(memory.get("peak_bytes")), memory.get("memory_source"), memory.get("constant_memory"),
            graphs["reason"],
        )


def _oom_message(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _after_oom(
    rows: list[int], queue: deque[list[int]], message: str, result: EvalResult, oom: list[dict]
) -> deque[list[int]]:
    """Halve the batch size for this batch and the rest of the run; a single sequence that still fails is failed."""
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
