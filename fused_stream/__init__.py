"""fused_stream: exact, constant-memory teacher-forced evaluation of Moshi-architecture speech LMs.

A frame's path: `data` (codes) -> `inputs` (checks, batching) -> `alignment` (delays, masks) -> `driver`
(streaming steps, per-step loss) -> `result` (EvalResult). `reference` holds the batch and naive paths.
"""

__version__ = "0.1.0"

from .driver import EvalConfig, StreamingEvaluator
from .models import load_model
from .reference import batch_losses, naive_streaming_losses
from .result import EvalResult

__all__ = [
    "EvalConfig",
    "EvalResult",
    "StreamingEvaluator",
    "batch_losses",
    "load_model",
    "naive_streaming_losses",
]
