"""The exact teacher-forced streaming driver: one frame (or an exact chunk of C frames) per step.

A frame's path: the whole delayed sequence D [B, K, L] sits on the device; at step s the driver gathers
D[:, :, s : s + C + 1] with the device counter `pos`, runs `forward_text` (streaming, ring KV cache) on the first
C columns and `forward_depformer_training` (non-streaming over the K codebooks) on the last C, and one launch of
`kernels.cross_entropy` scores every row and writes it into a preallocated loss buffer at original time
t = s + j - delay_k; `pos` then advances on the device.
Nothing in the step loop reads a device value on the host; the losses are copied to the host once per batch,
after its last step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention

from .alignment import delayed_sequence, scored_delays, valid_masks
from .inputs import INVALID_TOKEN_POLICIES, batches_by_length, check_codes, pad_batch
from .kernels.cross_entropy import N_COUNTERS, advance_, check_backend, step_cross_entropy_
from .result import EvalResult, empty_result, fill_rows
from .runtime import inference_mode

ProgressFn = Callable[[int, int], None]  # (steps done, total steps), called from the host-side step count


@dataclass
class EvalConfig:
    chunk_size: int = 1  # frames per step: 1 = frame mode (deployment semantics), C > 1 = exact chunk mode
    batch_size: int | None = None  # sequences per batch; None = all at once
    device: str | None = None  # move the model there first; None = where the model is
    dtype: str | torch.dtype | None = None  # cast the model first ("bfloat16", torch.float32, ...); None = as is
    loss_backend: str = "auto"  # "auto" (Triton on CUDA, torch on CPU) | "torch" | "triton" (CPU: interpreter only)
    cuda_graphs: str = "auto"  # "auto" | "off" (graph capture arrives with the graph runner)
    invalid_tokens: str = "raise"  # "raise" a ValueError, or "mask" bad tokens and count them
    progress: bool | ProgressFn = False  # tqdm bar, or a callback (steps done, total steps)

    def validate(self) -> None:
        if not _is_positive_int(self.chunk_size):
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.batch_size is not None and not _is_positive_int(self.batch_size):
            raise ValueError(f"batch_size must be None or an int >= 1, got {self.batch_size!r}")
        self.torch_dtype()
        if self.loss_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"loss_backend must be 'auto', 'torch' or 'triton', got {self.loss_backend!r}")
        if self.cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} is not available yet: use 'auto' or 'off'")
        if self.invalid_tokens not in INVALID_TOKEN_POLICIES:
            raise ValueError(f"invalid_tokens must be one of {INVALID_TOKEN_POLICIES}, got {self.invalid_tokens!r}")

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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def evaluate(self, codes: torch.Tensor | list[torch.Tensor]) -> EvalResult:
        """Losses for codes [B, K, T] or a list of [K, T_i]; each sequence's result equals evaluating it alone."""
        model, cfg = self.model, self.config
        checked = check_codes(model, codes, cfg.invalid_tokens)
        lengths = [s.shape[1] for s in checked.sequences]
        batches = batches_by_length(lengths, cfg.batch_size)
        total_steps = sum(math.ceil(lengths[rows[0]] / cfg.chunk_size) for rows in batches)
        result = empty_result(len(lengths), model.dep_q, max(lengths))
        result.n_masked_tokens = checked.n_masked_tokens
        progress = _Progress(cfg.progress, total_steps)
        state_bytes: list[int] = []
        counts = torch.zeros(N_COUNTERS, dtype=torch.long)
        start = time.perf_counter()
        try:
            with inference_mode(model):
                for rows in batches:
                    batch, batch_lengths = pad_batch(model, [checked.sequences[i] for i in rows])
                    losses, text_losses, batch_counts, nbytes = self._evaluate_batch(batch, batch_lengths, progress)
                    valid, text_valid = valid_masks(model, batch, batch_lengths)
                    fill_rows(result, rows, losses, text_losses, valid, text_valid, batch_lengths)
                    state_bytes.append(nbytes)
                    counts += batch_counts
        finally:
            progress.close()
        elapsed = time.perf_counter() - start
        result.report.update(
            path="streaming",
            chunk_size=cfg.chunk_size,
            loss_backend=self.loss_backend,
            batches=len(batches),
            steps=total_steps,
            frames=sum(lengths),
            seconds=elapsed,
            frames_per_second=sum(lengths) / elapsed if elapsed > 0 else float("nan"),
            state_bytes=max(state_bytes),
            scored_positions=int(counts[0]),  # counted on the device by the loss kernel
            nonfinite_logit_rows=int(counts[1]),
            bad_targets=int(counts[2]),
        )
        return result

    def _evaluate_batch(
        self, codes: torch.Tensor, lengths: torch.Tensor, progress: _Progress
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Stream one padded batch codes [B, K, T] of `lengths`.

        Returns host tensors: losses [B, dep_q, T], text losses [B, 1, T], loss counters [3]; and state bytes.
        """
        model, C = self.model, self.config.chunk_size
        device = self.device
        B, _, T = codes.shape
        n_steps = math.ceil(T / C)
        # The padded tail of the last chunk reads zero tokens; its outputs fall past T and are dropped.
        delayed = delayed_sequence(model, codes.to(device), length=n_steps * C + 1)  # [B, K, L + 1], once on device
        # One loss buffer for text (channel 0) and audio (1 .. dep_q), indexed by original time shifted right by
        # `lead`, so the (discarded) rows of negative times at the start land in the lead columns; plus the
        # kernel's trash column at the end.
        lead = max(scored_delays(model))
        losses = torch.full((B, 1 + model.dep_q, lead + n_steps * C + 1), float("nan"), device=device)
        counts = torch.zeros(N_COUNTERS, dtype=torch.long, device=device)
        step = _Step(model, delayed, lengths.to(device), losses, counts, lead, C, self.loss_backend)
        with model.streaming(B):
            if C > 1:
                enlarge_kv_caches(model, context_extra=C - 1)
            for _ in range(n_steps):
                step()
                progress.advance()
            nbytes = streaming_state_bytes(model) + step.nbytes()
        host = losses[:, :, lead : lead + T].cpu()  # the batch's copy to host, after its last step
        return host[:, 1:], host[:, :1], counts.cpu(), nbytes


class _Step:
    """One streaming step; all its inputs and outputs are device tensors, its position a device counter."""

    def __init__(
        self,
        model: LMModel,
        delayed: torch.Tensor,  # [B, K, L + 1]
        lengths: torch.Tensor,  # [B] int64
        losses: torch.Tensor,  # [B, 1 + dep_q, lead + L] float32: text, then audio codebooks
        counts: torch.Tensor,  # [3] int64 loss counters (see kernels.cross_entropy)
        lead: int,
        chunk: int,
        backend: str,
    ) -> None:
        self.model, self.delayed, self.lengths, self.losses, self.counts = model, delayed, lengths, losses, counts
        device = delayed.device
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # delayed step s, advanced on device
        self.window = torch.arange(chunk + 1, device=device)  # [C + 1]
        self.delays = torch.tensor(scored_delays(model), device=device)  # [1 + dep_q], one per loss channel
        self.lead, self.chunk, self.backend = lead, chunk, backend

    def __call__(self) -> None:
        model, C = self.model, self.chunk
        cols = self.delayed.index_select(2, self.pos + self.window)  # [B, K, C + 1]
        transformer_out, text_logits = model.forward_text(cols[:, :, :C])  # [B, C, D], [B, 1, C, text_card]
        logits = model.forward_depformer_training(cols[:, :, 1:], transformer_out)  # [B, dep_q, C, card]
        targets = cols[:, : 1 + model.dep_q, 1:]  # [B, 1 + dep_q, C]: step s predicts the next delayed column
        step_cross_entropy_(
            text_logits, logits, targets, self.delays, self.lengths, self.pos, self.losses, self.counts,
            self.lead, self.backend,
        )
        advance_(self.pos, C)

    def nbytes(self) -> int:
        """Bytes of the per-step working tensors (excluding the [B, K, T] inputs and loss outputs)."""
        tensors = (self.pos, self.window, self.delays, self.lengths, self.counts)
        return sum(t.untyped_storage().nbytes() for t in tensors)


def enlarge_kv_caches(model: LMModel, context_extra: int) -> None:
    """Give every temporal-transformer ring KV cache `context + context_extra` slots (call inside streaming()).

    Why: moshi sizes the ring to `context`. A chunk writes its C keys before its C queries attend, so the ring
    then holds only the last `context` positions, ending at the chunk's last frame; the chunk's first query
    needs keys reaching back `context - 1` frames before *its own* position, C - 1 of which were just
    overwritten. With `context + C - 1` slots every needed key is still there; the attention mask
    (delta < context) still limits each query to exactly `context` keys, so results equal frame mode.
    """
    for module in model.transformer.modules():
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        state = module._streaming_state
        if state is None or state.kv_cache is None or module.context is None:
            continue
        old = state.kv_cache
        _, batch, heads, _, dim_per_head = old.cache.shape
        respect_exec_mask, device, dtype = old.respect_exec_mask, old.cache.device, old.cache.dtype
        # Drop every reference to the old ring before allocating the larger one: for Moshi 7B at B = 32 the
        # two would coexist for 1.5 GB per layer otherwise.
        state.kv_cache = old = None
        state.kv_cache = RingKVCache(
            batch, heads, dim_per_head, module.context + context_extra,
            respect_exec_mask=respect_exec_mask, device=device, dtype=dtype,
        )


def streaming_state_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the tensors of every streaming state of `model` (KV caches, offsets, masks)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for module in model.modules():
        visit(getattr(module, "_streaming_state", None))
    return total


class _Progress:
    """Host-side step counter driving a tqdm bar or a callback; never touches device values."""

    def __init__(self, progress: bool | ProgressFn, total: int) -> None:
        self.done, self.total = 0, total
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", desc="streaming")

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
