"""errors.py: one base class for the package's own errors, each keeping the built-in base it always had, and the
test that tells a GPU fault from a problem with the input."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import fused_stream
from fused_stream.errors import FusedStreamError, is_device_fault

# Every error class of the package and the built-in base it had before FusedStreamError, which existing callers'
# `except ValueError` / `except AssertionError` rely on. Written out by hand: a new class must be added here.
BUILT_IN_BASES = {
    "BenchReportError": ValueError,
    "CheckpointError": ValueError,
    "CompareError": ValueError,
    "ConfigError": ValueError,
    "ConstantMemoryError": AssertionError,
    "DataError": ValueError,
    "GraphCaptureError": RuntimeError,
    "GraphMismatchError": AssertionError,
    "OutputLockedError": RuntimeError,
    "ParityError": AssertionError,
    "PreflightError": MemoryError,
    "ResumeMismatchError": ValueError,
}
# A bug or a moshi change, not the user's input: reported by the CLI as an internal error (traceback, exit 3).
NOT_THE_USERS = {"ModelChangedError"}


def _error_classes() -> dict[str, type]:
    """Every class named *Error that a module of the package defines (its own `__main__` modules not run)."""
    found = {}
    for info in pkgutil.walk_packages(fused_stream.__path__, "fused_stream."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and name.endswith("Error") and obj is not FusedStreamError):
                found[name] = obj
    return found


def test_every_error_of_the_package_is_a_fused_stream_error_and_keeps_its_old_base():
    classes = _error_classes()
    assert set(classes) == set(BUILT_IN_BASES) | NOT_THE_USERS  # a new error class must be classified here
    for name, cls in classes.items():
        if name in NOT_THE_USERS:
            assert not issubclass(cls, FusedStreamError), name
            continue
        assert issubclass(cls, FusedStreamError), name
        assert issubclass(cls, BUILT_IN_BASES[name]), name  # `except ValueError` written earlier still catches it


def test_the_base_class_is_public():
    assert fused_stream.FusedStreamError is FusedStreamError and "FusedStreamError" in fused_stream.__all__


@pytest.mark.parametrize("exc,fault", [
    (RuntimeError("CUDA error: device-side assert triggered"), True),  # how torch < 2.8 words it
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("shape mismatch in conv"), False),
    (ValueError("CUDA error: but a ValueError"), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # the run's size
])
def test_a_device_fault_is_told_from_other_errors(exc, fault):
    assert is_device_fault(exc) is fault


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8 has no AcceleratorError")
def test_torch_accelerator_errors_are_device_faults_whatever_their_message():
    assert is_device_fault(torch.AcceleratorError("unspecified launch failure"))
