"""The command-line evaluator `python -m fused_stream.eval` (`main`), its settings, run, partial results and locks.

Importing this package under `python -m fused_stream.eval` makes a Ctrl-C during start-up (the imports of torch
and moshi take seconds) print one line and exit 130 instead of a traceback; `main` then handles signals itself.
`fused_stream/__init__.py` imports it first for that reason. Under any other program it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENTRY_MODULE = "fused_stream.eval"


def quiet_startup_interrupts() -> bool:
    """Install the start-up SIGINT handler when this process is `python -m fused_stream.eval`; whether it did."""
    if not _starting_as(ENTRY_MODULE) or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False  # someone chose how SIGINT is handled: leave it

    def stop(signum: int, _frame: object) -> None:
        print("interrupted while starting: nothing was evaluated or written", file=sys.stderr, flush=True)
        # Exit at once: nothing is open or written yet, and an exception raised in the middle of a native
        # extension's import (torch, triton) can abort the interpreter (seen: SIGABRT) instead of unwinding.
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    return True


def _starting_as(module: str) -> bool:
    """Python sets sys.argv[0] to "-m" while it locates the module of `python -m MODULE` (whose packages it is
    importing now)."""
    return sys.argv[:1] == ["-m"] and module in getattr(sys, "orig_argv", [])


quiet_startup_interrupts()
