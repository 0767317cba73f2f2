"""Shared fixtures: a session-wide `tiny` model on CPU and seeded code generators. GPU tests skip cleanly."""

from __future__ import annotations

import pytest
import torch

from fused_stream.data import generate_codes
from fused_stream.models import load_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture
def make_codes():
    """make_codes(model, lengths, seed): a list of [K, T_i] tensors (int lengths give a [B, K, T] tensor)."""

    def make(model, lengths, seed=0):
        if isinstance(lengths, int):
            return generate_codes(model, 1, lengths, seed=seed)
        return generate_codes(model, len(lengths), list(lengths), seed=seed)

    return make
