"""`python -m fused_stream.gpu_check`: see `fused_stream.gpu_check.run`.

`bootstrap.prepare` runs first, before anything imports torch or moshi: it installs moshi from the wheels when the
machine lacks it, or exits 2 with one line saying what is missing.
"""

import sys

from .bootstrap import prepare

prepare(sys.argv[1:])

from .run import main  # noqa: E402 - after the bootstrap made moshi importable

sys.exit(main())
