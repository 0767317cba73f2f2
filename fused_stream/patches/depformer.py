"""The depformer of a streaming step with its per-codebook weights stacked: one batched matmul per projection.

moshi's `LMModel.forward_depformer_training` runs the depformer over the dep_q codebooks of every frame. With
`depformer_weights_per_step` each codebook step k has its own linears in every layer (`apply_weights_per_step`
loops over the steps: dep_q small matmuls per projection), and `depformer_in`, the embeddings and the output
`linears` are one module per codebook too. Per step of Moshi 7B that is ~1500 aten calls, ~530 of them kernels.

`StackedDepformer` computes the same function (bit for bit in the cases measured; up to float rounding, e.g. one
bf16 step with rms_norm) in the *step-major* layout x [dep_q, N, D] (N = B * T frames): each projection is one
`torch.bmm` against weights stacked once, when the Stream opens, into [dep_q, out, in] tensors (nn.Linear's layout,
multiplied through a transposed view like `F.linear`); the dep_q + 1 token embeddings are one lookup in a
concatenated table; the attention mask over the dep_q positions
is built once. Norms and layer scales are moshi's own modules, called on [dep_q, N, D] (they act on the last
dim), so moshi's lazily compiled RMS norm runs as in moshi.

Memory: the stacked copies double the depformer's weights while a Stream is open (Moshi 7B bf16: ~1.3 GB;
`stacked_bytes`). They are allocated before any CUDA graph capture and never rebound (engine/graphs.py).

`prepare_depformer(model)` decides once, when the Stream opens, and returns either a `StackedDepformer` or
moshi's own `model.forward_depformer_training` for anything it does not reproduce exactly (see
`unsupported_reason`): LoRA / quantized linears, TTT or other layer classes, hooks, biases, rope, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.models.lm_utils import ScaledEmbedding
from moshi.modules.gating import ActivationGating
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformer, StreamingTransformerLayer
from torch import nn

DepformerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sequence [B, K, T], out [B, T, dim])

# The depformer attends over the dep_q codebooks of each of the B * C frames of a step, one SDPA batch element per
# frame. CUDA's memory-efficient attention puts the batch in a grid dimension capped at 65,535 (pytorch issue
# 142228): `small` at chunk_size="auto" and a few hundred sequences passes it. Larger calls are split into slices
# of at most this many frames: host-side shapes, fixed per Stream, so a captured step keeps them.
MAX_ATTENTION_BATCH = 65_535


def prepare_depformer(model: LMModel, frames: int | None = None, stack: bool = True) -> DepformerFn:
    """The depformer a Stream of `model` calls: stacked when `stack` and `model` is a configuration it reproduces,
    else moshi's (called in slices of at most MAX_ATTENTION_BATCH frames when a step's `frames`, B * C, exceed it).

    The stacked weights are detached copies taken now: a Stream opened with gradients enabled gets moshi's function
    (gradients must reach the parameters), and weights changed while a Stream is open are not seen by it.
    """
    if not stack or torch.is_grad_enabled() or unsupported_reason(model) is not None:
        if frames is not None and frames > MAX_ATTENTION_BATCH:
            return _FrameBounded(model.forward_depformer_training)
        return model.forward_depformer_training
    return StackedDepformer(model)


class _FrameBounded:
    """moshi's `forward_depformer_training` called on slices of the batch of at most MAX_ATTENTION_BATCH frames
    (B * T) each: its depformer attends with one batch element per frame. A callable object, not a closure, so the
    graph-safety snapshot does not walk into it."""

    def __init__(self, fn: DepformerFn) -> None:
        self.fn = fn

    def __call__(self, sequence: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        B, _, T = sequence.shape
        if B * T <= MAX_ATTENTION_BATCH:
            return self.fn(sequence, transformer_out)
        rows = max(1, MAX_ATTENTION_BATCH // T)
        return torch.cat([self.fn(sequence[i:i + rows], transformer_out[i:i + rows]) for i in range(0, B, rows)])


def unsupported_reason(model: LMModel) -> str | None:
    """Why `StackedDepformer` cannot stand in for `model.forward_depformer_training`, or None when it can.

    Only plain moshi modules of the exact types below are accepted (not subclasses): any other class may compute
    something else in its forward, and a forward hook would be skipped by calling weights directly.
    """
    Ka = model.dep_q
    if type(model).forward_depformer_training is not LMModel.forward_depformer_training:
        return "forward_depformer_training is overridden"
    if Ka < 2 or model.depformer is None or not model.depformer_multi_linear or model.audio_offset != 1:
        return "no multi-linear depformer"
    dep = model.depformer
    if type(dep) is not StreamingTransformer or dep.positional_embedding != "none" or dep.rope is not None:
        return "depformer is not a plain StreamingTransformer without positional embedding"
    if not dep._streaming_detached or dep._streaming_state is not None:
        return "depformer runs in streaming mode"
    if any(not isinstance(norm, nn.Identity) for norm in model.depformer_norms):
        return "depformer_norms"  # moshi applies them to 2D slices; rare, not reproduced
    schedule = model.depformer_weights_per_step_schedule
    for emb in [model.depformer_text_emb, *model.depformer_emb]:
        if type(emb) is not ScaledEmbedding or emb.norm is not None or emb.low_rank is not None \
                or emb.demux_second_stream or emb.zero_idx != -1 or emb.max_norm is not None:
            return "depformer embeddings are not plain ScaledEmbeddings"
    linears = [*model.depformer_in, *model.linears]
    for layer in dep.layers:
        if type(layer) is not StreamingTransformerLayer:
            return f"depformer layer {type(layer).__name__}"
        attn, gating = getattr(layer, "self_attn", None), layer.gating
        if layer.skip_self_attn or layer.cross_attention is not None or type(attn) is not StreamingMultiheadAttention:
            return "depformer layer without plain self-attention"
        if attn.kv_repeat != 1 or attn.rope is not None or attn.weights_per_step != Ka or len(attn.in_projs) < 2:
            return "depformer attention without weights per step (or with kv_repeat / rope)"
        if attn.weights_per_step_schedule != schedule or layer.weights_per_step_schedule != schedule:
            return "depformer schedule differs between modules"
        if not isinstance(gating, nn.ModuleList) or any(type(g) is not ActivationGating for g in gating):
            return "depformer feed-forward is not per-step ActivationGating"
        linears += [*attn.in_projs, *attn.out_projs, *(g.linear_in for g in gating), *(g.linear_out for g in gating)]
    if any(type(linear) is not nn.Linear for linear in linears):
        return "a depformer linear is not nn.Linear (LoRA, quantized)"
    if any(len({g.linear_in.weight.shape for g in layer.gating}) != 1 for layer in dep.layers):
        return "per-step feed-forward widths differ"
    if any(linear.bias is not None for linear in linears):
        return "depformer linears with bias"
    modules = [model, dep, *model.depformer_in, *model.linears, model.depformer_text_emb, *model.depformer_emb,
               *dep.modules()]
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules) or _global_hooks():
        return "forward hooks on the depformer"
    return None


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


@dataclass
class _Layer:
    """One depformer layer: moshi's norm / layer-scale modules and its per-step weights stacked [Ka, out, in]."""

    norm1: nn.Module
    norm2: nn.Module
    scale1: nn.Module
    scale2: nn.Module
    in_t: torch.Tensor  # [Ka, D, 3D]: transposed view of the stacked in_projs
    out_t: torch.Tensor  # [Ka, D, D]
    gate_in_t: torch.Tensor  # [Ka, D, 2H]
    gate_out_t: torch.Tensor  # [Ka, H, D]
    activation: Callable[[torch.Tensor], torch.Tensor]
    heads: int


def _stacked_t(modules: list[nn.Module], steps: list[int]) -> torch.Tensor:
    """[Ka, in, out]: the steps' weights [out, in] stacked (one copy), viewed transposed as F.linear multiplies."""
    return torch.stack([modules[i].weight.detach() for i in steps]).transpose(1, 2)


class StackedDepformer:
    """`model.forward_depformer_training` with stacked per-codebook weights (see the module docstring)."""

    def __init__(self, model: LMModel) -> None:
        Ka = self.dep_q = model.dep_q
        schedule = model.depformer_weights_per_step_schedule
        steps = list(schedule) if schedule is not None else list(range(Ka))
        text = model.depformer_text_emb.weight.detach()
        audio = [emb.weight.detach() for emb in model.depformer_emb]
        # One table: text rows, then each audio codebook's rows, then a row of zeros for the zero token (moshi:
        # `where(input == -1, 0, emb)`, exact zeros); step k reads its own block through `row_offsets`.
        self.table = torch.cat([text, *audio, text.new_zeros(1, text.shape[1])])
        self.zero_row = self.table.shape[0] - 1
        sizes = [0, text.shape[0]] + [w.shape[0] for w in audio][:-1]
        self.row_offsets = torch.tensor(sizes, device=text.device).cumsum(0).view(Ka, 1, 1)
        # depformer_in of every step as one [dim, Ka * Ddep] matmul: one launch instead of Ka.
        self.in_t = torch.cat([model.depformer_in[i].weight.detach() for i in steps]).t()
        self.layers = [
            _Layer(
                layer.norm1, layer.norm2, layer.layer_scale_1, layer.layer_scale_2,
                _stacked_t(list(layer.self_attn.in_projs), steps), _stacked_t(list(layer.self_attn.out_projs), steps),
                _stacked_t([g.linear_in for g in layer.gating], steps),
                _stacked_t([g.linear_out for g in layer.gating], steps),
                layer.gating[0].activation, layer.self_attn.num_heads,
            )
            for layer in model.depformer.layers
        ]
        self.out_t = _stacked_t(list(model.linears), list(range(Ka)))  # [Ka, Ddep, card]: one per codebook
        # moshi's non-streaming attention mask over the Ka codebook positions (pos_q - pos_k = delta), built once.
        attn = model.depformer.layers[0].self_attn
        delta = torch.arange(Ka, device=text.device).view(-1, 1) - torch.arange(Ka, device=text.device)
        mask = delta >= 0
        if attn.context is not None:
            mask &= delta < attn.context
        self.mask = mask if attn.causal else None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this holds (for the Stream's memory accounting)."""
        held = [self.table, self.row_offsets, self.in_t, self.out_t]
        held += [t for layer in self.layers for t in (layer.in_t, layer.out_t, layer.gate_in_t, layer.gate_out_t)]
        return held + ([self.mask] if self.mask is not None else [])

    def __call__(self, sequence: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """sequence [B, K, T] (the inputs, one column ahead of transformer_out), transformer_out [B, T, dim] ->
        logits [B, dep_q, T, card] (a permuted view for B > 1)."""
        Ka = self.dep_q
        B, _, T = sequence.shape
        N = B * T
        # Step k's token: the text (k = 0) or audio stream k (moshi: k + audio_offset - 1, audio_offset == 1).
        tokens = sequence[:, :Ka].transpose(0, 1)  # [Ka, B, T]
        # Other negative tokens read row 0 of their block, like ScaledEmbedding's clamp. A token past its own
        # vocabulary would read the next block here where moshi raises: inputs are checked before they stream.
        rows = torch.where(tokens == -1, self.zero_row, tokens.clamp(min=0) + self.row_offsets)
        emb = F.embedding(rows, self.table)  # [Ka, B, T, Ddep], contiguous
        proj = torch.mm(transformer_out.reshape(N, -1), self.in_t).view(N, Ka, -1)  # [N, Ka, Ddep]
        x = emb.view(Ka, N, -1) + proj.transpose(0, 1)  # [Ka, N, Ddep], contiguous like `emb`
        for layer in self.layers:
            x = _layer(x, layer, self.mask)
        logits = torch.bmm(x, self.out_t)  # [Ka, N, card]
        return logits.view(Ka, B, T, -1).transpose(0, 1)


def _layer(x: torch.Tensor, layer: _Layer, mask: torch.Tensor | None) -> torch.Tensor:
    """moshi's StreamingTransformerLayer.forward (non-streaming, weights per step) on x [Ka, N, D]."""
    Ka, N, D = x.shape
    H = layer.heads
    # Self-attention block: the Ka codebook steps of each frame attend to each other (q, k, v [N, H, Ka, D/H]).
    qkv = torch.bmm(layer.norm1(x), layer.in_t).view(Ka, N, 3, H, D // H).permute(2, 1, 3, 0, 4)
    attended = _attention(qkv[0], qkv[1], qkv[2], mask)
    update = torch.bmm(attended.permute(2, 0, 1, 3).reshape(Ka, N, D), layer.out_t)
    x = x.to(update) + layer.scale1(update)
    # Feed-forward block: moshi's ActivationGating (gating_forward_kernel) per step.
    gate = torch.bmm(layer.norm2(x), layer.gate_in_t).view(Ka, N, 2, -1)
    update = torch.bmm(layer.activation(gate[..., 0, :]) * gate[..., 1, :], layer.gate_out_t)
    return x.to(update) + layer.scale2(update)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over q, k, v [N, H, Ka, D/H], in slices of at most MAX_ATTENTION_BATCH frames (each frame's attention is
    independent of the others: the slices compute what one call would)."""
    N = q.shape[0]
    if N <= MAX_ATTENTION_BATCH:
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0)
    return torch.cat([F.scaled_dot_product_attention(q[i:i + MAX_ATTENTION_BATCH], k[i:i + MAX_ATTENTION_BATCH],
                                                     v[i:i + MAX_ATTENTION_BATCH], mask, dropout_p=0.0)
                      for i in range(0, N, MAX_ATTENTION_BATCH)])


def depformer_stack_bytes(model: LMModel, dtype: torch.dtype | None = None) -> int:
    """Bytes a Stream of `model` will hold in `StackedDepformer`'s copies (0 when it will use moshi's function), for
    the preflight, before anything is built: the depformer's embeddings, projections and output linears once more
    (in `dtype`, default the model's)."""
    if unsupported_reason(model) is not None:
        return 0
    weights = [model.depformer_text_emb.weight, *(e.weight for e in model.depformer_emb),
               *(lin.weight for lin in model.depformer_in), *model.depformer.parameters(),
               *(lin.weight for lin in model.linears)]
    return sum(w.numel() * (w.element_size() if dtype is None else dtype.itemsize) for w in weights)


def stacked_bytes(depformer: DepformerFn) -> int:
    """Bytes the stacked weights hold (0 for moshi's own function)."""
    if not isinstance(depformer, StackedDepformer):
        return 0
    return sum(t.untyped_storage().nbytes() for t in depformer.tensors())
