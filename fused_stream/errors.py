"""`DataError`, the one error for a problem with the data to evaluate, and `one_line` for its messages.

Why a module of its own, at the bottom: the data layer (codes, audio, Mimi, datasets) and the core's
`layout_codes` both raise it, and the core must not import the data layer.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data to evaluate: the message names the file and what is wrong, on one line."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__
