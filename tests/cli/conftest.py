"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest

import fused_stream.cli.run as run_module


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must refuse bad input before the first one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(run_module, "open_model", refuse)
