"""fused_stream: exact, constant-memory teacher-forced evaluation of Moshi-architecture speech LMs.

A frame's path: `data` (codes) -> `inputs` (checks, batching) -> `alignment` (delays, masks) -> `preflight`
(memory plan) -> `driver` (batches, monitor, report) -> `stream` (the step on static buffers, replayed by
`graphs`) -> `kernels.cross_entropy` (per-step loss) -> `result` (EvalResult). `reference` holds the batch and
naive paths.
"""

__version__ = "0.1.0"

from .api import evaluate_long_context_loss
from .compat import PaperMetricsLibriLight
from .driver import ConstantMemoryError, EvalConfig, StreamingEvaluator
from .graphs import GraphCaptureError, GraphMismatchError
from .models import load_model
from .preflight import PreflightError
from .reference import batch_losses, naive_streaming_losses
from .result import EvalResult

__all__ = [
    "ConstantMemoryError",
    "EvalConfig",
    "EvalResult",
    "GraphCaptureError",
    "GraphMismatchError",
    "PaperMetricsLibriLight",
    "PreflightError",
    "StreamingEvaluator",
    "batch_losses",
    "evaluate_long_context_loss",
    "load_model",
    "naive_streaming_losses",
]
