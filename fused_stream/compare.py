"""`python -m fused_stream.compare OUT_A OUT_B [...] --out DIR`: compare runs made separately (see
`fused_stream.cli.compare`)."""

import sys

from .cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
