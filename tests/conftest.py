"""Shared fixtures: a session-wide `tiny` model on CPU and seeded code generators. GPU tests skip cleanly."""

from __future__ import annotations

import logging
import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when fused_stream.kernels is first imported: it
# must be set before any fused_stream import so CPU tests run the real kernel under Triton's interpreter.
# On a CUDA machine the GPU tests need the compiled kernel instead, so leave it unset there.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fused_stream.data.codes import generate_codes  # noqa: E402
from fused_stream.data.models import load_model  # noqa: E402


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


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts calls of Mimi's encode (every Mimi instance): a cache hit or memoized codes make none."""
    from moshi.models.compression import MimiModel

    calls = []
    original = MimiModel.encode

    def spy(self, x):
        calls.append(x.shape[-1])
        return original(self, x)

    monkeypatch.setattr(MimiModel, "encode", spy)
    return calls


@pytest.fixture(autouse=True)
def _quiet_busy_cpu_check(monkeypatch):
    """The CLI warns when other work keeps its CPUs busy; inside pytest that other work is pytest itself (torch's
    spinning threads after the previous test), so in-process runs would print the warning at random. Tests of the
    warning patch `idle_cpus` themselves."""
    monkeypatch.setattr("fused_stream.cli.main.idle_cpus", lambda: None)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test, restored after. Tiny models are thousands of small ops: on a busy 2-CPU
    machine torch's two OpenMP threads spin against other processes and a 1 s test takes 30 s or more. Exactness
    does not depend on it: both sides of every comparison run in the same process with the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mimi_setup(tmp_path_factory):
    """(a small random-weight Mimi of the tiny preset's card, as a training loop holds it; the same Mimi saved as a
    checkpoint, as the CLI loads it)."""
    from fused_stream.data.mimi import random_mimi, save_mimi_checkpoint, small_mimi_config

    config = small_mimi_config(card=64)  # the tiny preset's audio card
    mimi = random_mimi(config, seed=0)
    return mimi, save_mimi_checkpoint(mimi, tmp_path_factory.mktemp("mimi") / "ckpt", config)



_ROOT_LEVEL = logging.getLogger().level  # the root logger's level when the session starts


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """The CLI configures the root logger (`basicConfig(force=True)`, level ERROR with -q), also from module-scoped
    fixtures that run before this one: every test starts at the session's level, and the root's handlers are put
    back after it, so a test's caplog sees the warnings it asserts whatever ran before it."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.setLevel(_ROOT_LEVEL)
    yield
    root.setLevel(_ROOT_LEVEL)
    root.handlers[:] = handlers
