"""`python -m fused_stream.compare OUT_A OUT_B [...] --out DIR`: compare runs made separately (see
`fused_stream.cli.compare`). A Ctrl-C while it starts (importing torch) prints one line and exits 130."""

import sys

from .cli.startup import quiet_startup_interrupts

if __name__ == "__main__":
    started = quiet_startup_interrupts("nothing was compared or written")

from .cli.compare import main  # noqa: E402 - after the start-up handler: this import takes seconds

if __name__ == "__main__":
    started()  # compare's main has no handler of its own: from here a Ctrl-C is a KeyboardInterrupt
    sys.exit(main())
