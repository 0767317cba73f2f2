"""`python -m fused_stream.eval`: the command-line evaluator (see `fused_stream.cli.main`).

A Ctrl-C before `main` handles signals (while torch and moshi import) prints one line and exits 130: the start-up
handler is installed here, before the imports that take seconds, so the library never has to import the CLI.
"""

import sys

from .cli.startup import quiet_startup_interrupts


def main(argv: list[str] | None = None) -> int:
    """`cli.main.main`, imported only once the start-up handler is installed (the import takes seconds)."""
    from .cli.main import main as evaluate  # noqa: PLC0415 - after the start-up handler, on purpose

    return evaluate(argv)


if __name__ == "__main__":
    quiet_startup_interrupts("nothing was evaluated or written")  # until main's own handler takes over
    sys.exit(main())
