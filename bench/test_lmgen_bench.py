"""The anchor a Moshi user would pick today: moshi's own `LMGen` streaming loop, teacher-forced.

`LMGen.step(user_tokens, depformer_replace_tokens=model_tokens)` feeds the data's own audio instead of sampling it
(on GPU through moshi's CUDA-graphed step). It yields no per-codebook loss — the depformer's logits are never
computed — so it measures speed only; `bench_report` shows every path's speed-up against it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from moshi.models.lm import LMGen
from moshi.utils.compile import no_compile


def _lmgen_loop(model):
    def run(codes: torch.Tensor) -> None:
        B, _, T = codes.shape
        codes = codes.to(model.device)
        user, own = codes[:, 1 + model.dep_q :], codes[:, 1 : 1 + model.dep_q]
        gen = LMGen(model, use_sampling=False)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                if model.device.type != "cuda":
                    stack.enter_context(no_compile())
                stack.enter_context(gen.streaming(B))
                for t in range(T):
                    gen.step(user[:, :, t : t + 1], depformer_replace_tokens=own[:, :, t : t + 1])
            if model.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            model.set_streaming_detached(False)  # LMGen detaches the model it wraps; hand it back as it came

    return run


@pytest.mark.parametrize("batch", [1, 8])
def test_lmgen_teacher_forced(run_case, bench_model, batch):
    was_training = bench_model.training
    bench_model.eval()  # LMGen refuses a model in training mode
    try:
        run_case(f"lmgen_teacher_forced_B{batch}", _lmgen_loop(bench_model), batch=batch, rounds=1 if batch == 1 else 2)
    finally:
        bench_model.train(was_training)
