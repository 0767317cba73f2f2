"""chunk_size="auto": the cap, balanced steps, the memory limit, and never below 1 or above the longest sequence."""

from __future__ import annotations

import pytest
import torch
from moshi.models.lm import LMModel

from fused_stream.data.models import preset_config
from fused_stream.plan.chunk_choice import AUTO_CAP, balanced_chunk, choose_chunk_size, resolve_chunk_size
from fused_stream.plan.preflight import PreflightError, estimate_run_bytes

PLENTY = 2**40


@pytest.mark.parametrize(("longest", "cap", "unroll", "expected"), [
    (600, 256, 1, 200),  # 3 steps of 200, not 256 + 256 + 88 padded
    (3000, 256, 1, 250),  # 12 steps of 250
    (1024, 256, 1, 256),
    (257, 256, 1, 129),
    (100, 100, 1, 100),
    (1000, 256, 2, 250),  # calls of C * 2 frames: 2 calls of 500
    (5, 1, 1, 1),
])
def test_balanced_chunk_keeps_the_steps_and_drops_the_padding(longest, cap, unroll, expected):
    assert balanced_chunk(longest, cap, unroll) == expected


def test_plenty_of_memory_gives_the_capped_balanced_chunk(tiny_model):
    assert AUTO_CAP == 256
    C, why = choose_chunk_size(tiny_model, 3000, 1, PLENTY)
    assert C == 250 and why.startswith("auto: C=250 (capped, cap 256: 12 steps")
    assert choose_chunk_size(tiny_model, 600, 4, PLENTY)[0] == 200
    # Never above what is useful: a short run is one step of exactly its length.
    C, why = choose_chunk_size(tiny_model, 40, 1, PLENTY)
    assert C == 40 and "= longest sequence" in why and "1 step for" in why
    assert choose_chunk_size(tiny_model, 1, 1, PLENTY)[0] == 1
    assert choose_chunk_size(tiny_model, 1000, 1, PLENTY, cap=1)[0] == 1


def test_tight_memory_gives_a_smaller_chunk(tiny_model):
    # Exactly enough for C = 128 over 1024 frames: every larger C has a larger ring and step, so 128 is the answer.
    need = estimate_run_bytes(tiny_model, 2, 128, 1024).run_bytes
    C, why = choose_chunk_size(tiny_model, 1024, 2, need / 0.85)
    assert C == 128 and "limited by memory" in why and "B=2" in why
    assert estimate_run_bytes(tiny_model, 2, 129, 129 * 8).run_bytes > need
    # Just enough for frame mode: C = 1, never below.
    frame = estimate_run_bytes(tiny_model, 2, 1, 1024).run_bytes
    assert choose_chunk_size(tiny_model, 1024, 2, frame / 0.85)[0] == 1
    with pytest.raises(PreflightError, match="chunk_size=1"):
        choose_chunk_size(tiny_model, 1024, 2, frame / 0.85 - 1000)


def test_the_chosen_chunk_always_fits(tiny_model):
    top = estimate_run_bytes(tiny_model, 1, 250, 3000).run_bytes
    frame = estimate_run_bytes(tiny_model, 1, 1, 3000).run_bytes
    chosen = []
    for share in (0.1, 0.4, 0.7, 0.95):
        budget = frame + share * (top - frame)
        C, _ = choose_chunk_size(tiny_model, 3000, 1, budget / 0.85)
        frames = -(-3000 // C) * C
        assert 1 <= C < 250 and estimate_run_bytes(tiny_model, 1, C, frames).run_bytes <= budget
        chosen.append(C)
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]  # more memory, a larger chunk


def test_moshi_7b_on_an_h100_sized_budget():
    """The real architecture on the meta device: 80 GB leaves room for the cap at B = 8; a few GB do not."""
    model = LMModel(**preset_config("moshi-7b"), device="meta", dtype=torch.bfloat16)
    assert choose_chunk_size(model, 3000, 8, 80 * 10**9)[0] == 250
    C, why = choose_chunk_size(model, 3000, 8, 17 * 10**9)  # (C=1 needs 13.1 GiB, the stacked depformer included)
    assert C < 250 and "limited by memory" in why


def test_resolve_keeps_an_asked_chunk_and_sizes_auto_for_the_batch(tiny_model):
    assert resolve_chunk_size(64, tiny_model, 600, 4, "auto", PLENTY, "test") == (64, "chunk_size=64 as asked")
    assert resolve_chunk_size(1, tiny_model, 600, 4, 2, PLENTY, "test")[1].endswith("(frame mode)")
    # batch_size "auto" fits itself to what C leaves: C is sized for one sequence; an asked B (at most the
    # sequences there are; None = all of them) is what C must leave room for.
    assert "B=1 " in resolve_chunk_size("auto", tiny_model, 600, 4, "auto", PLENTY, "test")[1]
    assert "B=3 " in resolve_chunk_size("auto", tiny_model, 600, 3, 8, PLENTY, "test")[1]
    assert "B=4 " in resolve_chunk_size("auto", tiny_model, 600, 4, None, PLENTY, "test")[1]
    C, why = resolve_chunk_size("auto", tiny_model, 600, 4, 2, PLENTY, "test", unroll=2)
    assert C == 150 and why.endswith("available, test)")  # 2 calls of 2 steps of 150 frames
