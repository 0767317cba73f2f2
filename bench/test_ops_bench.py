"""aten ops issued by one `Stream.step()`: what Python and the dispatcher pay per step, and what a GPU launches.

Cases: `small` at B=1 in frame mode (C=1) and chunk mode (C=64), and Moshi 7B's structure (`loaders._lm_kwargs`:
32 layers, a 6-layer depformer with weights per step, dep_q 8, n_q 16, its delays) at tiny dims, where the count
is that of the real 7B (op counts do not depend on the widths). Each case runs with the Stream's depformer
(`patches/depformer.py`, stacked weights) and with moshi's `forward_depformer_training`, so one run shows both.

Counting: a `TorchDispatchMode` sees every aten op once, at the level the backend kernels run (after composite ops
such as `linear` or `matmul` decompose into `t` + `mm`), so `aten_ops` is the number of kernel calls dispatched and
`kernel_ops` those that are not views or allocations (what launches a GPU kernel; on the GPU the loss is one Triton
launch outside aten). `torch.profiler`'s event count, `dispatcher_calls`, also counts the composite wrappers each
op passes through (aten::linear > aten::matmul > aten::mm): the dispatcher's overhead, not kernels. Both land in
`extra_info`; the time is one `step()` (rough on a shared CPU). `FUSED_STREAM_BENCH_FRAMES` sizes the stream.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from torch.utils._python_dispatch import TorchDispatchMode

from fused_stream.core.runtime import inference_mode
from fused_stream.data.codes import generate_codes
from fused_stream.data.models import default_device, default_dtype, load_model
from fused_stream.engine.stream import Stream
from fused_stream.kernels.backends import resolve_backend

DEVICE = torch.device(os.environ.get("FUSED_STREAM_BENCH_DEVICE") or default_device())
FRAMES = int(os.environ.get("FUSED_STREAM_BENCH_FRAMES", "600"))
# Ops that only make a view or an uninitialized tensor: no kernel on any device.
_NO_KERNEL = {"aten._unsafe_view", "aten._reshape_alias", "aten.empty", "aten.empty_like", "aten.empty_strided",
              "aten.lift_fresh", "aten.unbind", "aten.split", "aten.split_with_sizes"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, by overload packet (`aten.mm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        self.views += bool(func.is_view or name in _NO_KERNEL)
        return func(*args, **(kwargs or {}))


def _moshi_7b_structure() -> LMModel:
    """Moshi 7B's configuration with every width shrunk; layer counts, dep_q, n_q and delays kept."""
    config = dict(loaders._lm_kwargs) | {
        "dim": 64, "num_heads": 4, "card": 64, "text_card": 96,
        "depformer_dim": 32, "depformer_num_heads": 4, "depformer_dim_feedforward": int(4.125 * 32),
    }
    torch.manual_seed(0)
    return LMModel(**config).to(DEVICE, default_dtype(DEVICE)).eval()


_MODELS: dict[str, LMModel] = {}


def _model(name: str) -> LMModel:
    if name not in _MODELS:
        _MODELS[name] = (load_model("small", device=DEVICE, seed=0) if name == "small" else _moshi_7b_structure())
    return _MODELS[name]


def _profiled_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


@pytest.mark.parametrize("depformer", ["stacked", "moshi"])
@pytest.mark.parametrize("name, C", [("small", 1), ("small", 64), ("moshi-7b-structure", 1),
                                     ("moshi-7b-structure", 64)],
                         ids=["small-frame", "small-C64", "7b-frame", "7b-C64"])
def test_ops_per_step(benchmark, name, C, depformer):
    model = _model(name)
    frames = max(FRAMES, 2 * C)
    codes = generate_codes(model, 1, frames, seed=0).to(DEVICE)
    backend = resolve_backend("auto", DEVICE)
    with inference_mode(model):
        stream = Stream(model, 1, C, frames, backend)
        try:
            if depformer == "moshi":
                stream.depformer = model.forward_depformer_training  # the path before patches/depformer.py
            stream.load(codes, torch.tensor([frames], device=DEVICE))
            stream.step()  # warm-up: allocator, lazy init, kernel compilation
            with OpCounter() as counter:
                stream.step()
            dispatcher_calls = _profiled_calls(stream.step)
            aten_ops = sum(counter.ops.values())
            benchmark.extra_info.update(
                path=f"ops_{name}_C{C}_{depformer}", model=name, B=1, C=C, depformer=depformer,
                stacked=type(stream.depformer).__name__ == "StackedDepformer", loss_backend=backend,
                device=str(DEVICE), dtype=str(model.dtype), aten_ops=aten_ops, kernel_ops=aten_ops - counter.views,
                dispatcher_calls=dispatcher_calls, top_ops=dict(counter.ops.most_common(12)),
            )

            def step() -> None:
                stream.step()
                if DEVICE.type == "cuda":
                    torch.cuda.synchronize(DEVICE)

            benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
        finally:
            stream.close()
    assert aten_ops > 0 and 0 < aten_ops - counter.views <= aten_ops
