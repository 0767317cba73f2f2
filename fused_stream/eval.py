"""`python -m fused_stream.eval`: the command-line evaluator (see `fused_stream.cli.main`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
