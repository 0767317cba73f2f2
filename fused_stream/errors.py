"""`DataError`, the one error for a problem with the data to evaluate, and `one_line` for its messages.

Why a module of its own: `data` (sequences), `audio` (decoding, encoding) and `mimi` (checkpoints) all raise it,
and `data` imports the other two; living here, below all three, it needs no import cycle. `fused_stream.data`
re-exports it, so `from fused_stream.data import DataError` keeps working.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data to evaluate: the message names the file and what is wrong, on one line."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__
