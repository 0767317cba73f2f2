"""`FusedStreamError`, the base of the package's own errors; `DataError`, the one error for a problem with the data
to evaluate; and `one_line` for their messages.

Why a module of its own, at the bottom: every layer raises these, and the core must not import the data layer.

The package's own errors are raised on purpose: for a user's input (a bad option, file, checkpoint or run that
cannot fit) or for a verdict (the model streams unlike its forward, memory grew). Each also keeps the built-in base
it always had (`DataError` is a `ValueError`, `ParityError` an `AssertionError`, ...), so an `except ValueError`
written against an earlier release still catches it. The command line turns a `FusedStreamError` into one line and
its documented exit code; any other exception is a bug (of this package, of a library, of the driver or the GPU)
and is reported as one, with its traceback (`fused_stream.cli.crash`).
"""

from __future__ import annotations

import sys


class FusedStreamError(Exception):
    """An error this package raises on purpose, for a user's input or a verdict: its message names what is wrong
    (and, for input, the fix). Anything else that escapes the package is a bug, not the user's mistake."""


class DataError(FusedStreamError, ValueError):
    """A problem with the data to evaluate: the message names the file and what is wrong, on one line."""


def is_device_fault(exc: BaseException) -> bool:
    """Whether `exc` is a fault the GPU or its driver reported (a device-side assert, an illegal memory access, a
    failed launch): no input file or option explains it, so a handler that would blame the input must let it pass.
    Running out of memory is not one (that is the run's size, handled where it happens)."""
    accelerator_error = getattr(sys.modules.get("torch"), "AcceleratorError", None)  # torch >= 2.8; never imported here
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")  # how older torch words them


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__
