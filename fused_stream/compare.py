"""`python -m fused_stream.compare OUT_A OUT_B [...] --out DIR`: compare runs made separately (see
`fused_stream.cli.compare`). A Ctrl-C while it starts (importing torch) prints one line and exits 130."""

import sys

from .cli.startup import quiet_startup_interrupts


def main(argv: list[str] | None = None) -> int:
    """`cli.compare.main`, imported only once the start-up handler is installed (the import takes seconds)."""
    from .cli.compare import main as compare  # noqa: PLC0415 - after the start-up handler, on purpose

    return compare(argv)


if __name__ == "__main__":
    started = quiet_startup_interrupts("nothing was compared or written")
    import fused_stream.cli.compare  # noqa: F401 - the slow import, still under the start-up handler

    started()  # compare's main has no handler of its own: from here a Ctrl-C is a KeyboardInterrupt
    sys.exit(main())
