"""`python -m fused_stream.eval`: the command-line evaluator (see `fused_stream.cli.main`).

A Ctrl-C before `main` handles signals (while torch and moshi import) prints one line and exits 130: the start-up
handler lives in `fused_stream.cli`, which the package imports first, before the imports that take seconds.
"""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
