"""`python -m fused_stream.gpu_check`: see `fused_stream.gpu_check.run`."""

import sys

from .run import main

sys.exit(main())
