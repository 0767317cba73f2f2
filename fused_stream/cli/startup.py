"""A Ctrl-C while a command is still starting (importing torch and moshi takes seconds): one line, exit 130.

The entry points (`fused_stream/eval.py`, `fused_stream/compare.py`) call `quiet_startup_interrupts` first, before
they import the command, so the library itself never imports the command line for this. `main` then handles
signals itself while it runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable


def quiet_startup_interrupts(nothing_done: str) -> Callable[[], None]:
    """From now on a SIGINT prints "interrupted while starting: `nothing_done`" and exits 130, until the command
    installs its own handler or calls the function returned, which puts Python's back (a KeyboardInterrupt). Only
    from the main thread, and only when nobody chose how SIGINT is handled."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return _nothing  # someone chose how SIGINT is handled: leave it

    def stop(signum: int, _frame: object) -> None:
        print(f"interrupted while starting: {nothing_done}", file=sys.stderr, flush=True)
        # Exit at once: nothing is open or written yet, and an exception raised in the middle of a native
        # extension's import (torch, triton) can abort the interpreter (seen: SIGABRT) instead of unwinding.
        os._exit(128 + signum)

    def started() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, stop)
    return started


def _nothing() -> None:
    pass
