"""The stacked depformer (patches/depformer.py) computes moshi's `forward_depformer_training`, and falls back to it for
configurations it does not reproduce; a Stream uses it and still equals the batch path."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_all_linear_with_lora
from reference_ce import assert_losses_close
from torch.utils._python_dispatch import TorchDispatchMode

from fused_stream.core.config import EvalConfig
from fused_stream.core.runtime import inference_mode
from fused_stream.data.models import preset_config
from fused_stream.engine.driver import StreamingEvaluator
from fused_stream.engine.stream import Stream
from fused_stream.patches.depformer import (
    StackedDepformer,
    depformer_stack_bytes,
    prepare_depformer,
    stacked_bytes,
    unsupported_reason,
)
from fused_stream.verify.reference import batch_losses

_SHRUNK = {"card": 64, "text_card": 96}
CONFIGS = {
    "tiny": preset_config("tiny"),
    # `small`'s structure (4 layers, 2 depformer layers, its hidden scales) at test dims.
    "small-structure": preset_config("small") | _SHRUNK | {
        "dim": 64, "num_heads": 4, "context": 24, "depformer_dim": 32, "depformer_dim_feedforward": int(4.125 * 32),
    },
    # Steps sharing weights (`depformer_weights_per_step_schedule`): the stack repeats the shared ones.
    "tiny-schedule": preset_config("tiny") | {"depformer_weights_per_step_schedule": [0, 1, 1, 2, 2, 2, 3, 3],
                                              "depformer_num_layers": 2},
    # Moshi 7B's structure (32 layers, 6 depformer layers, dep_q 8, n_q 16, its delays) at test dims.
    "moshi-7b-structure": dict(loaders._lm_kwargs) | _SHRUNK | {
        "dim": 64, "num_heads": 4, "context": 24, "depformer_dim": 32, "depformer_num_heads": 4,
        "depformer_dim_feedforward": int(4.125 * 32),
    },
}


def _model(config: dict) -> LMModel:
    torch.manual_seed(0)
    return LMModel(**config).eval()


@pytest.fixture(scope="module")
def models():
    return {name: _model(config) for name, config in CONFIGS.items()}


def _inputs(model: LMModel, B: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A depformer input: tokens of every stream (initial tokens and zero tokens included) and transformer_out."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(-1, model.text_card + 1, (B, 1, C), generator=g)
    audio = torch.randint(-1, model.card + 1, (B, model.n_q, C), generator=g)
    return torch.cat([text, audio], dim=1), torch.randn(B, C, model.dim, generator=g)


@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stacked_depformer_equals_moshi(models, one_torch_thread, name, B, C):
    model = models[name]
    assert unsupported_reason(model) is None
    with inference_mode(model):
        depformer = prepare_depformer(model)
        assert isinstance(depformer, StackedDepformer)
        sequence, transformer_out = _inputs(model, B, C, seed=10 * B + C)
        sequence[0, 0, 0] = sequence[-1, 3, -1] = model.zero_token_id  # zero tokens embed as exact zeros
        expected = model.forward_depformer_training(sequence, transformer_out)
        got = depformer(sequence, transformer_out)
    assert got.shape == expected.shape == (B, model.dep_q, C, model.card)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max |stacked - moshi| = {diff}"


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_one_matmul_per_projection_whatever_dep_q(models):
    """The point of stacking: depformer_in, each layer's 4 projections and the output linears are one matmul each,
    where moshi runs dep_q of each (208 on Moshi 7B's structure)."""
    model = models["moshi-7b-structure"]
    sequence, transformer_out = _inputs(model, 2, 3, seed=0)
    with inference_mode(model):
        depformer = prepare_depformer(model)
        with _Ops() as stacked:
            depformer(sequence, transformer_out)
        with _Ops() as moshi:
            model.forward_depformer_training(sequence, transformer_out)
    matmuls = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm")
    layers = len(model.depformer.layers)
    assert sum(stacked.ops[op] for op in matmuls) == 2 + 4 * layers
    assert sum(moshi.ops[op] for op in matmuls) == model.dep_q * (2 + 4 * layers)
    assert sum(stacked.ops.values()) * 4 < sum(moshi.ops.values())


def test_stacked_weights_are_copies_counted_by_the_stream(models):
    model = models["tiny"]
    with inference_mode(model):
        stream = Stream(model, 1, 2, 8, "torch")
        try:
            depformer = stream.depformer
            assert isinstance(depformer, StackedDepformer)
            held = stacked_bytes(depformer)
            # every depformer weight once (not the norms: moshi's modules run), plus one zero row of the embedding
            # table, the attention mask and the table's row offsets
            weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                          if name.startswith(("depformer.", "depformer_in", "depformer_emb", "depformer_text_emb",
                                              "linears")) and not name.endswith(".alpha"))
            assert weights < held < weights + 4096
            # The preflight's estimate, taken before anything is built, within that slack; in bf16, half.
            assert held - 4096 < depformer_stack_bytes(model) <= held
            assert depformer_stack_bytes(model, torch.bfloat16) == depformer_stack_bytes(model) // 2
            own = {t.untyped_storage().data_ptr() for t in depformer.tensors()}
            assert not own & {p.untyped_storage().data_ptr() for p in model.parameters()}
        finally:
            stream.close()


def _lora(model: LMModel) -> LMModel:
    lora = copy.deepcopy(model)
    replace_all_linear_with_lora(lora, rank=2, scaling=1.0)
    return lora


def _hooked(model: LMModel) -> LMModel:
    hooked = copy.deepcopy(model)
    hooked.depformer.layers[0].register_forward_hook(lambda module, args, out: out * 2)
    return hooked


@pytest.mark.parametrize("make, reason", [
    (_lora, "not nn.Linear"),
    (_hooked, "hooks"),
    (lambda m: _model(preset_config("tiny") | {"depformer_weights_per_step": False}), "weights per step"),
    (lambda m: _model(preset_config("tiny") | {"depformer_multi_linear": False}), "multi-linear"),
    (lambda m: _model(preset_config("tiny") | {"depformer_pos_emb": "rope"}), "positional embedding"),
], ids=["lora", "hook", "no-weights-per-step", "no-multi-linear", "rope"])
def test_unsupported_configurations_fall_back_to_moshi(models, one_torch_thread, make, reason):
    model = make(models["tiny"])
    assert reason in (unsupported_reason(model) or "")
    with inference_mode(model):
        stream = Stream(model, 2, 4, 8, "torch")
        try:
            assert stream.depformer == model.forward_depformer_training  # moshi's own, decided when it opened
            assert stacked_bytes(stream.depformer) == 0 and depformer_stack_bytes(model) == 0
        finally:
            stream.close()


@pytest.mark.parametrize("graphs", ["auto", "rehearse"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_streamed_losses_with_the_stacked_depformer_equal_the_batch_path(
    tiny_model, make_codes, monkeypatch, one_torch_thread, chunk, graphs
):
    calls = []
    original = StackedDepformer.__call__
    monkeypatch.setattr(StackedDepformer, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    codes = make_codes(tiny_model, [40, 23], seed=3)
    result = StreamingEvaluator(tiny_model, EvalConfig(chunk_size=chunk, cuda_graphs=graphs)).evaluate(codes)
    assert calls  # the stream ran the stacked depformer
    batch = batch_losses(tiny_model, codes)
    assert torch.equal(result.valid, batch.valid) and torch.equal(result.text_valid, batch.text_valid)
    assert_losses_close(result.losses, batch.losses)
    assert_losses_close(result.text_losses, batch.text_losses)


def test_gradients_enabled_fall_back_to_moshi(models):
    """The stacked weights are detached copies: a step that needs gradients must run moshi's own modules."""
    model = models["tiny"]
    with torch.enable_grad():
        assert prepare_depformer(model) == model.forward_depformer_training
    with torch.no_grad():
        assert isinstance(prepare_depformer(model), StackedDepformer)


def test_attention_batches_past_the_cuda_grid_limit_are_split(models, one_torch_thread, monkeypatch):
    """The depformer attends with one batch element per frame (B * C); past MAX_ATTENTION_BATCH (CUDA's grid limit of
    65,535, lowered here to 5) the stacked depformer splits its attention and moshi's function is called on slices of
    the batch: the same logits (stacked: bit for bit), and no attention call ever sees more than the limit."""
    from fused_stream.patches import depformer as depformer_module

    model = models["moshi-7b-structure"]
    sequence, transformer_out = _inputs(model, 3, 4, seed=5)  # 12 frames
    with inference_mode(model):
        stacked = prepare_depformer(model, frames=12)
        whole = stacked(sequence, transformer_out)
        expected = model.forward_depformer_training(sequence, transformer_out)
        batches = []
        real = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q, *args, **kwargs):
            batches.append(q.shape[0])
            return real(q, *args, **kwargs)

        monkeypatch.setattr(depformer_module, "MAX_ATTENTION_BATCH", 5)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        split = stacked(sequence, transformer_out)
        assert batches and max(batches) <= 5
        assert torch.equal(split, whole)
        batches.clear()
        with torch.enable_grad():  # moshi's own function (gradients must reach the parameters): sliced by sequence
            moshis = prepare_depformer(model, frames=12)
            assert not isinstance(moshis, StackedDepformer)
            sliced = moshis(sequence, transformer_out)
        assert batches and max(batches) <= 5
    torch.testing.assert_close(sliced.detach(), expected, rtol=0, atol=1e-6)
