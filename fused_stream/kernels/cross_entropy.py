"""Fused masked per-codebook cross-entropy of one streaming step: Triton kernel, launcher and torch twin.

One launch scores every row of a step — text rows [B, 1, C, text_card] and audio rows [B, dep_q, C, card] — and
writes each loss straight into the caller's loss buffer at its original time, so losses never leave the device
and the step needs no host input (CUDA-graph safe):

    out[b, ch, lead + t] = CE(logits row, targets[b, ch, j]),   t = offset + j - delays[ch]

`ch` is the loss channel (0 = text, 1 .. dep_q = audio codebooks, in the codes' order), `j` the frame inside the
chunk, `offset` the delayed step index read from a device int64 tensor, `lead = max(delays)` columns in front of
time 0 so the rows of the first steps (t < 0) land somewhere harmless instead of needing a branch. The last
column of `out` is a trash column: a row whose column `lead + t` falls outside [0, T_out - 1) writes its NaN
there (a data-dependent skip would not be graph-safe), so the caller sizes `out` as lead + frames + 1.

Validity (derived in the kernel, documented here once): a row is scored when its position is inside its own
sequence, `0 <= t` and `offset + j < lengths[b]` (which is `t + delays[ch] < T_b`: exactly the delay mask of
`LMModel.forward` on that sequence alone), its column lies inside the buffer, and its target is a token of the
vocabulary, `0 <= target < V` (the zero token -1, padding and the initial token fall outside). Other rows write
NaN, never 0.0.

Counters (`counts`, int64 [3], accumulated on the device, read once at the end):
    counts[0]  rows scored;
    counts[1]  scored rows whose logits sum to a non-finite fp32 value: any NaN or +-inf in the row (finite
               logits would need magnitudes near 1e34 to overflow the sum). Their loss is whatever IEEE gives;
    counts[2]  rows at a valid position whose target is neither the zero token nor inside [0, V) — a bad token
               that got past input checks; such rows write NaN and are never read out of bounds.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

try:  # triton ships with torch on Linux; elsewhere only the torch twin exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    triton = None

ZERO_TOKEN = -1
N_COUNTERS = 3


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _score_row(
        # data pointers
        logits_ptr, targets_ptr, delays_ptr, lengths_ptr, offset_ptr, out_ptr, counts_ptr,
        # which row
        b, k, j, channel,
        # shapes
        V, T_out, lead,
        # strides (elements)
        stride_lb, stride_lk, stride_lc, stride_lv,
        stride_tb, stride_tc, stride_tj,
        stride_ob, stride_oc, stride_ot,
        # constants
        ZERO: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # int64 before any multiply: b * stride_lb passes 2^31 elements for large steps (e.g. B*C = 4096 frames
        # x 32000 text logits), and a wrapped int32 offset would read another row silently.
        b = b.to(tl.int64)
        k = k.to(tl.int64)
        j = j.to(tl.int64)
        channel = channel.to(tl.int64)
        row_ptr = logits_ptr + b * stride_lb + k * stride_lk + j * stride_lc

        target = tl.load(targets_ptr + b * stride_tb + channel * stride_tc + j * stride_tj)
        step = tl.load(offset_ptr) + j  # the delayed step index, from device memory (never a Python int)
        t = step - tl.load(delays_ptr + channel)
        in_sequence = (t >= 0) & (step < tl.load(lengths_ptr + b))
        in_vocab = (target >= 0) & (target < V)
        valid = in_sequence & in_vocab

        # Online log-sum-exp over vocabulary blocks, fp32 right after every load (bf16 math is inexact).
        m = -float("inf")
        s = 0.0
        total = 0.0  # plain sum of the row: non-finite iff the row holds NaN or +-inf (the twin's test too)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_lv, mask=in_row, other=-float("inf")).to(tl.float32)
            total += tl.sum(tl.where(in_row, x, 0.0), 0)
            m_new = tl.maximum(m, tl.max(x, 0))
            # Guard -inf - -inf = NaN: a block (or a whole row) of -inf logits adds exp(-inf) = 0.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
            m = m_new
        safe_target = tl.where(in_vocab, target, 0)  # never an out-of-bounds read
        x_target = tl.load(row_ptr + safe_target * stride_lv).to(tl.float32)
        loss = m + tl.log(s) - x_target

        col = lead + t
        in_buffer = (col >= 0) & (col < T_out - 1)
        valid = valid & in_buffer
        col = tl.where(in_buffer, col, T_out - 1)  # the trash column
        tl.store(out_ptr + b * stride_ob + channel * stride_oc + col * stride_ot, tl.where(valid, loss, float("nan")))
        # Counters: relaxed atomics, issued only when there is something to add (most rows add to counts[0] only).
        one = tl.full((), 1, tl.int64)
        nonfinite = (total != total) | (tl.abs(total) == float("inf"))
        tl.atomic_add(counts_ptr + 0, one, mask=valid, sem="relaxed")
        tl.atomic_add(counts_ptr + 1, one, mask=valid & nonfinite, sem="relaxed")
        tl.atomic_add(counts_ptr + 2, one, mask=in_sequence & (target != ZERO) & ~in_vocab, sem="relaxed")

    @triton.jit
    def _step_cross_entropy_kernel(
        # data pointers
        text_ptr, audio_ptr, targets_ptr, delays_ptr, lengths_ptr, offset_ptr, out_ptr, counts_ptr,
        # shapes
        K_AUDIO, C, V_TEXT, V_AUDIO, T_out, lead,
        # strides
        stride_xb, stride_xk, stride_xc, stride_xv,  # text logits [B, 1, C, V_TEXT]
        stride_ab, stride_ak, stride_ac, stride_av,  # audio logits [B, K_AUDIO, C, V_AUDIO]
        stride_tb, stride_tc, stride_tj,  # targets [B, 1 + K_AUDIO, C]
        stride_ob, stride_oc, stride_ot,  # out [B, 1 + K_AUDIO, T_out]
        n_text_rows,
        # constants
        ZERO: tl.constexpr, BLOCK_TEXT: tl.constexpr, BLOCK_AUDIO: tl.constexpr,
    ):
        # One program per row. The long text rows (32000 logits) take the first program ids so they start first
        # and the short audio rows fill in behind them.
        pid = tl.program_id(0)
        if pid < n_text_rows:
            j = pid % C
            b = pid // C
            _score_row(text_ptr, targets_ptr, delays_ptr, lengths_ptr, offset_ptr, out_ptr, counts_ptr,
                       b, 0 * b, j, 0 * b, V_TEXT, T_out, lead,
                       stride_xb, stride_xk, stride_xc, stride_xv, stride_tb, stride_tc, stride_tj,
                       stride_ob, stride_oc, stride_ot, ZERO, BLOCK_TEXT)
        else:
            r = pid - n_text_rows
            j = r % C
            k = (r // C) % K_AUDIO
            b = r // (C * K_AUDIO)
            _score_row(audio_ptr, targets_ptr, delays_ptr, lengths_ptr, offset_ptr, out_ptr, counts_ptr,
                       b, k, j, k + 1, V_AUDIO, T_out, lead,
                       stride_ab, stride_ak, stride_ac, stride_av, stride_tb, stride_tc, stride_tj,
                       stride_ob, stride_oc, stride_ot, ZERO, BLOCK_AUDIO)


def triton_available() -> bool:
    return triton is not None


def triton_interpreted() -> bool:
    """True when the kernel was built under TRITON_INTERPRET=1 (it is read when this module is imported)."""
    return triton is not None and type(_step_cross_entropy_kernel).__name__ == "InterpretedFunction"


def _block(V: int) -> int:
    # Large blocks: fewer dependent loop trips per row on GPU (a 32000-wide text row takes 4), and far fewer
    # interpreted numpy calls on CPU.
    return min(triton.next_power_of_2(V), 8192)


def _warps(block: int) -> int:
    return max(4, min(16, block // 512))  # about 16 logits per thread


# ---------------------------------------------------------------------------------------------------------------
# Launcher and functional API
# ---------------------------------------------------------------------------------------------------------------
def check_step_args(text_logits, audio_logits, targets, delays, lengths, offset, out, counts, lead: int) -> None:
    """Shapes, dtypes and devices only (host metadata, graph-safe): a mismatch would make the kernel read or
    write past its buffers silently."""
    if audio_logits.dim() != 4 or text_logits.dim() != 4:
        shapes = f"text {tuple(text_logits.shape)}, audio {tuple(audio_logits.shape)}"
        raise ValueError(f"logits must be [B, K, C, V]: {shapes}")
    B, K, C, _ = audio_logits.shape
    expected = {
        "text_logits": (text_logits.shape[:3], (B, 1, C)),
        "targets": (targets.shape, (B, 1 + K, C)),
        "delays": (delays.shape, (1 + K,)),
        "lengths": (lengths.shape, (B,)),
        "offset": (offset.shape, ()),
        "out": (out.shape[:2], (B, 1 + K)),
        "counts": (counts.shape, (N_COUNTERS,)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            audio = tuple(audio_logits.shape)
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want} (audio logits {audio})")
    for name, tensor in (("targets", targets), ("delays", delays), ("lengths", lengths), ("offset", offset),
                         ("counts", counts)):
        if tensor.dtype != torch.long:
            raise ValueError(f"{name} must be int64, got {tensor.dtype}")
    if out.dtype != torch.float32 or out.shape[2] < 2:
        raise ValueError(f"out must be float32 with a trash column, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in (text_logits, audio_logits, targets, delays, lengths, offset, out, counts)}
    if len(devices) != 1:
        raise ValueError(f"all step tensors must be on one device, got {sorted(map(str, devices))}")
    if lead < 0:
        raise ValueError(f"lead must be >= 0, got {lead}")


def launch_triton(text_logits, audio_logits, targets, delays, lengths, offset, out, counts, lead: int) -> None:
    B, K_audio, C, V_audio = audio_logits.shape
    V_text = text_logits.shape[-1]
    n_text_rows = B * C
    grid = (n_text_rows + B * K_audio * C,)
    block_text, block_audio = _block(V_text), _block(V_audio)
    # Triton launches on the *current* CUDA device, not on its arguments' device: with the model on cuda:1 and
    # cuda:0 current, an unguarded launch would read cuda:1 pointers on cuda:0.
    guard = torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _step_cross_entropy_kernel[grid](
            text_logits, audio_logits, targets, delays, lengths, offset, out, counts,
            K_audio, C, V_text, V_audio, out.shape[2], lead,
            *text_logits.stride(), *audio_logits.stride(), *targets.stride(), *out.stride(),
            n_text_rows,
            ZERO=ZERO_TOKEN, BLOCK_TEXT=block_text, BLOCK_AUDIO=block_audio,
            num_warps=_warps(max(block_text, block_audio)),
        )


def advance_(offset: torch.Tensor, frames: int) -> None:
    """Move the device step counter on by `frames` (an in-place add a CUDA graph captures and replays)."""
    offset.add_(frames)


# ---------------------------------------------------------------------------------------------------------------
# Torch twin: identical semantics, used on CPU and as the tests' reference
# ---------------------------------------------------------------------------------------------------------------
def element_offsets(indices: list[torch.Tensor], strides: tuple[int, ...]) -> torch.Tensor:
    """sum(index * stride) in int64, as the kernel computes addresses: int32 math would wrap past 2^31 elements."""
    total = torch.zeros((), dtype=torch.long, device=indices[0].device)
    for index, stride in zip(indices, strides, strict=True):
        total = total + index.long() * stride
    return total


def step_cross_entropy_torch_(
    text_logits: torch.Tensor,
    audio_logits: torch.Tensor,
    targets: torch.Tensor,
    delays: torch.Tensor,
    lengths: torch.Tensor,
    offset: torch.Tensor,
    out: torch.Tensor,
    counts: torch.Tensor,
    lead: int,
) -> None:
    """The kernel's contract in torch ops (see the module docstring); no host sync.

    Masks and counters are computed once over all 1 + dep_q channels (a vocabulary size per channel); only the
    cross-entropy itself runs per vocabulary. What does not depend on the step (the chunk's frame indices, the
    rows' base addresses, the vocabulary sizes) is built once per shape (`_twin_constants`).
    """
    B, K, C, V_audio = audio_logits.shape
    T_out = out.shape[2]
    window, base, vocab = _twin_constants(out.device, B, 1 + K, C, out.stride(), out.storage_offset(),
                                          text_logits.shape[-1], V_audio)
    step = offset + window  # [C]
    t = step - delays.view(-1, 1)  # [1 + dep_q, C]
    col = t + lead
    in_buffer = (col >= 0) & (col < T_out - 1)
    col = torch.where(in_buffer, col, T_out - 1)  # the trash column
    in_sequence = (t >= 0) & (step < lengths.view(-1, 1, 1))  # [B, 1 + dep_q, C]
    in_vocab = (targets >= 0) & (targets < vocab)
    valid = in_sequence & in_buffer & in_vocab
    safe = torch.where(in_vocab, targets, 0)  # never an out-of-bounds read
    losses, sums = [], []
    for logits, rows in ((text_logits, safe[:, :1]), (audio_logits, safe[:, 1:])):
        x = logits.float()  # fp32 accumulation
        V = x.shape[-1]
        losses.append(F.cross_entropy(x.reshape(-1, V), rows.reshape(-1), reduction="none").view(rows.shape))
        sums.append(x.sum(dim=-1))
    nonfinite = ~torch.cat(sums, dim=1).isfinite()
    bad = in_sequence & (targets != ZERO_TOKEN) & ~in_vocab
    counts.add_(torch.stack([valid, valid & nonfinite, bad]).flatten(1).sum(1))
    # Write each row at out[b, ch, lead + t] through explicit int64 element offsets, like the kernel's stores.
    flat = out.as_strided((out.untyped_storage().nbytes() // out.element_size(),), (1,), 0)
    flat[base + col * out.stride(2)] = torch.where(valid, torch.cat(losses, dim=1), float("nan"))


@functools.lru_cache(maxsize=16)
def _twin_constants(
    device: torch.device, B: int, channels: int, C: int, strides: tuple[int, ...], storage_offset: int,
    V_text: int, V_audio: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame index in the chunk [C], each row's base element offset [B, channels, 1], vocabulary [1, channels, 1]).

    Cached per shape: the first call (a warm-up, before any capture) allocates them, later steps only read them.
    """
    b = torch.arange(B, device=device).view(B, 1, 1)
    ch = torch.arange(channels, device=device).view(1, channels, 1)
    base = element_offsets([b, ch], strides[:2]) + storage_offset
    vocab = torch.tensor([V_text] + [V_audio] * (channels - 1), device=device).view(1, channels, 1)
    return torch.arange(C, device=device), base, vocab
