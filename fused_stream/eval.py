"""`python -m fused_stream.eval`: the command-line evaluator (see `fused_stream.cli.main`).

A Ctrl-C before `main` handles signals (while torch and moshi import) prints one line and exits 130: the start-up
handler is installed here, before the imports that take seconds, so the library never has to import the CLI.
"""

import sys

from .cli.startup import quiet_startup_interrupts

if __name__ == "__main__":
    quiet_startup_interrupts("nothing was evaluated or written")  # until main's own handler takes over

from .cli.main import main  # noqa: E402 - after the start-up handler: this import takes seconds

if __name__ == "__main__":
    sys.exit(main())
