"""`python -m fused_stream.gpu_check`: see `fused_stream.gpu_check.run`.

`bootstrap.prepare` runs first, before anything imports torch or moshi: it installs moshi from the wheels when the
machine lacks it, or exits 2 with one line saying what is missing.
"""

import sys

from .bootstrap import prepare


def _main() -> int:
    prepare(sys.argv[1:])
    from .run import main  # noqa: PLC0415 - after the bootstrap made moshi importable, on purpose

    return main()


sys.exit(_main())
