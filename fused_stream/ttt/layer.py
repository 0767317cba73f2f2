"""A graph-safe reference TTT-Linear layer for moshi `LMModel`s, and `attach_ttt` to add it to a model.

TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time)"): per head a fast linear model f(k) = k + LN(k W + b)
is trained online on the reconstruction loss ½‖LN(θ_K x W + b) − (θ_V x − θ_K x)‖², and the layer outputs
f(θ_Q x) = θ_Q x + LN(θ_Q x W + b). Mini-batch gradient descent of size `mb`: every token of a mini-batch takes its
gradient at the mini-batch's starting weights W₀, token i of the mini-batch sees W₀ − tok_i Σ_{j≤i} η_j ∇_j with
tok_i = 1/(i+1) and η_j = base_lr · sigmoid(w·x_j + c) / head_dim per head; the mini-batch's last token's weights
become the next W₀.

Two implementations of that one recurrence, so each checks the other:
- non-streaming `forward` (what `LMModel.forward` runs): the dual form, a scan over mini-batches;
- streaming `forward`: the primal form, token by token, on state tensors allocated once by `_init_streaming_state`
  (W₀, b₀, the gradient sums, the position in the mini-batch, an update counter; one of each per batch element),
  updated in place with `torch.where` on the device position, so a CUDA-graph replay repeats every update and any
  chunk size C works (mini-batch boundaries may fall anywhere inside a chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

__all__ = ["TTTLinear", "TTTTransformerLayer", "attach_ttt"]

_EPS = 1e-6


@dataclass
class _TTTState(State):
    """Fast weights of every batch element; all fp32 device tensors whose addresses never change."""

    w0: torch.Tensor  # [B, H, d, d] weights at the current mini-batch's start
    b0: torch.Tensor  # [B, H, d]
    grad_w: torch.Tensor  # [B, H, d, d] Σ_{j ≤ i} η_j ∇W_j over the current mini-batch so far
    grad_b: torch.Tensor  # [B, H, d]
    pos: torch.Tensor  # [B] int64 position inside the mini-batch
    updates: torch.Tensor  # [B] int64 mini-batch updates applied since the last reset
    init_w: torch.Tensor  # [H, d, d] the parameters the state resets to (kept for the reset and the report)
    init_b: torch.Tensor  # [H, d]

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        # In place and per element: a captured graph keeps reading these addresses, and other rows keep streaming.
        m4, m3 = reset_mask.view(-1, 1, 1, 1), reset_mask.view(-1, 1, 1)
        self.w0.copy_(torch.where(m4, self.init_w.unsqueeze(0), self.w0))
        self.b0.copy_(torch.where(m3, self.init_b.unsqueeze(0), self.b0))
        self.grad_w.masked_fill_(m4, 0.0)
        self.grad_b.masked_fill_(m3, 0.0)
        self.pos.masked_fill_(reset_mask, 0)
        self.updates.masked_fill_(reset_mask, 0)


class TTTLinear(StreamingModule[_TTTState]):
    """x [B, T, D] -> x + tanh(alpha) · o_proj(post_norm(TTT-Linear(norm(x)))); streaming or over a whole sequence."""

    chunk_exact = True  # any chunk size streams it exactly (module docstring); read by patches.foreign

    def __init__(
        self, dim: int, num_heads: int, mini_batch: int = 16, base_lr: float = 1.0, alpha: float = 0.1,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if mini_batch < 1:
            raise ValueError(f"mini_batch must be >= 1, got {mini_batch}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.mini_batch, self.base_lr = mini_batch, base_lr
        d, H = self.head_dim, num_heads
        self.norm = nn.LayerNorm(dim, **kw)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **kw)  # θ_Q, θ_K, θ_V
        self.lr_gate = nn.Linear(dim, num_heads, **kw)  # token-dependent inner learning rate, one per head
        self.w_init = nn.Parameter(torch.randn(H, d, d, **kw) * 0.02)
        self.b_init = nn.Parameter(torch.zeros(H, d, **kw))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, d, **kw))  # the LN inside the inner model
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, d, **kw))
        self.post_norm = nn.LayerNorm(dim, **kw)
        self.o_proj = nn.Linear(dim, dim, bias=False, **kw)
        # Small but not zero: with alpha = 0 the layer would be invisible and no equivalence test could fail.
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha), **kw))

    # ---- streaming state -------------------------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _TTTState:
        device = self.w_init.device
        H, d, B = self.num_heads, self.head_dim, batch_size
        init_w, init_b = self.w_init.detach().float().clone(), self.b_init.detach().float().clone()
        return _TTTState(
            batch_size, device,
            w0=init_w.expand(B, H, d, d).clone(), b0=init_b.expand(B, H, d).clone(),
            grad_w=torch.zeros(B, H, d, d, device=device), grad_b=torch.zeros(B, H, d, device=device),
            pos=torch.zeros(B, dtype=torch.long, device=device),
            updates=torch.zeros(B, dtype=torch.long, device=device),
            init_w=init_w, init_b=init_b,
        )

    def fast_weight_tensors(self) -> dict[str, torch.Tensor]:
        """The protocol `TTTTracker` reads: current fast weights (streaming only), leading dim = batch."""
        state = self._streaming_state
        if state is None:
            return {}
        return {"w": state.w0, "b": state.b0}

    def updates_applied(self) -> torch.Tensor | None:
        """[B] device counter of mini-batch updates since the last reset (streaming only)."""
        state = self._streaming_state
        return None if state is None else state.updates

    # ---- shared pieces ---------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, d] and η [B, H, T], all fp32 (the inner loop is precision-sensitive)."""
        B, T, _ = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).float().view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        eta = self.base_lr * torch.sigmoid(self.lr_gate(h).float()).transpose(1, 2) / self.head_dim
        return q, k, v, eta

    def _ln(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head LN over the last dim of z [B, H, ..., d]: (output, normalized, 1/σ)."""
        shape = (1, self.num_heads) + (1,) * (z.dim() - 3) + (self.head_dim,)
        gamma, beta = self.ttt_norm_weight.float().view(shape), self.ttt_norm_bias.float().view(shape)
        mu = z.mean(-1, keepdim=True)
        rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + _EPS)
        xhat = (z - mu) * rstd
        return gamma * xhat + beta, xhat, rstd

    def _inner_grad(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """∂/∂z of ½‖LN(z) − target‖², by hand (no autograd: it runs under inference mode)."""
        y, xhat, rstd = self._ln(z)
        shape = (1, self.num_heads) + (1,) * (z.dim() - 3) + (self.head_dim,)
        g_xhat = (y - target) * self.ttt_norm_weight.float().view(shape)
        d = self.head_dim
        return (d * g_xhat - g_xhat.sum(-1, keepdim=True) - xhat * (g_xhat * xhat).sum(-1, keepdim=True)) * rstd / d

    def _output(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z [B, H, T, d] (the inner model's output on q) back into the residual stream of x [B, T, D]."""
        B, _, T, _ = z.shape
        z = z.transpose(1, 2).reshape(B, T, self.dim).to(x.dtype)
        return x + torch.tanh(self.alpha) * self.o_proj(self.post_norm(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, eta = self._project(x)
        if self._streaming_state is None:
            z, _, _ = self.scan(q, k, v, eta)
        else:
            z = self._stream(q, k, v, eta, self._streaming_state)
        return self._output(x, z)

    # ---- non-streaming: dual form, one mini-batch at a time ---------------------------------------------------
    def scan(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
        w0: torch.Tensor | None = None, b0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inner-model outputs z [B, H, T, d] and the committed fast weights (W, b) after the last full mini-batch."""
        B, H, T, d = q.shape
        w = self.w_init.float().expand(B, H, d, d) if w0 is None else w0
        b = self.b_init.float().expand(B, H, d) if b0 is None else b0
        outs = []
        for start in range(0, T, self.mini_batch):
            sl = slice(start, min(start + self.mini_batch, T))
            qm, km, vm, em = q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[:, :, sl]  # [B, H, n, d], η [B, H, n]
            n = qm.shape[2]
            grad = self._inner_grad(km @ w + b.unsqueeze(2), vm - km)  # at the mini-batch's starting weights
            tok = 1.0 / torch.arange(1, n + 1, device=q.device, dtype=q.dtype)
            coef = (tok.view(n, 1) * em.unsqueeze(2)).tril()  # [B, H, n, n]: tok_i · η_j for j ≤ i
            zq = qm @ w + b.unsqueeze(2) - (coef * (qm @ km.transpose(-1, -2)) + coef) @ grad
            outs.append(qm + self._ln(zq)[0])
            if n == self.mini_batch:  # streaming commits only full mini-batches too
                last = coef[:, :, -1].unsqueeze(-1)  # [B, H, n, 1]: tok_{n-1} · η_j
                w = w - km.transpose(-1, -2) @ (last * grad)
                b = b - (last * grad).sum(2)
        return torch.cat(outs, dim=2), w, b

    # ---- streaming: primal form, token by token, in place ----------------------------------------------------
    def _stream(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, s: _TTTState
    ) -> torch.Tensor:
        outs = []
        for t in range(q.shape[2]):  # C is static: the same kernels each call, so a graph replay repeats them
            qt, kt, vt, et = q[:, :, t], k[:, :, t], v[:, :, t], eta[:, :, t].unsqueeze(-1)  # [B, H, d], [B, H, 1]
            grad = self._inner_grad(torch.einsum("bhi,bhij->bhj", kt, s.w0) + s.b0, vt - kt)
            s.grad_w.add_(torch.einsum("bhi,bhj->bhij", kt, et * grad))
            s.grad_b.add_(et * grad)
            tok = (1.0 / (s.pos + 1).float()).view(-1, 1, 1)  # from the device position, never a Python int
            w = s.w0 - tok.unsqueeze(-1) * s.grad_w
            b = s.b0 - tok * s.grad_b
            outs.append(qt + self._ln(torch.einsum("bhi,bhij->bhj", qt, w) + b)[0])
            # Branch-free mini-batch boundary: commit W, clear the sums, wrap the position.
            commit = s.pos == self.mini_batch - 1  # [B] bool on the device
            c4, c3 = commit.view(-1, 1, 1, 1), commit.view(-1, 1, 1)
            s.w0.copy_(torch.where(c4, w, s.w0))
            s.b0.copy_(torch.where(c3, b, s.b0))
            s.grad_w.masked_fill_(c4, 0.0)
            s.grad_b.masked_fill_(c3, 0.0)
            s.updates.add_(commit.long())
            s.pos.copy_(torch.where(commit, torch.zeros_like(s.pos), s.pos + 1))
        return torch.stack(outs, dim=2)


class TTTTransformerLayer(StreamingTransformerLayer):
    """A moshi transformer layer with `self.ttt` between self-attention and the feed-forward (set by attach_ttt)."""

    ttt: TTTLinear
    chunk_exact = True  # moshi's layer around an exact TTTLinear

    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.ttt(super()._sa_block(x))


def attach_ttt(
    model: LMModel, layers: list[int], mini_batch: int = 16, base_lr: float = 1.0, alpha: float = 0.1,
    seed: int | None = None,
) -> LMModel:
    """Insert a TTTLinear into the given temporal-transformer layers of `model` (in place) and return it.

    Call it outside streaming mode. `seed` makes the new parameters reproducible without touching the global RNG:
    every generator it seeds (CPU and CUDA) is restored afterwards.
    """
    if model._streaming_state is not None:
        raise RuntimeError("attach_ttt must be called outside streaming mode")
    blocks = model.transformer.layers
    param = next(model.parameters())
    # torch.manual_seed seeds every generator (CPU and each CUDA device): fork_rng restores them all afterwards.
    devices = list(range(torch.cuda.device_count())) if seed is not None and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for index in layers:
            if not -len(blocks) <= index < len(blocks):
                raise IndexError(f"layer {index} out of range: the transformer has {len(blocks)} layers")
            layer = blocks[index]
            if isinstance(layer, TTTTransformerLayer):
                raise ValueError(f"layer {index} already has a TTT layer")
            attn = layer.self_attn
            ttt = TTTLinear(attn.embed_dim, attn.num_heads, mini_batch, base_lr, alpha,
                            device=param.device, dtype=param.dtype)
            layer.__class__ = TTTTransformerLayer  # a subclass: same state, forward, streaming idiom
            layer.ttt = ttt
    # moshi caches each module's streaming children on first use; forget them so the new layers stream too.
    for module in model.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None
    return model
