"""fused_stream: exact, constant-memory teacher-forced evaluation of Moshi-architecture speech LMs.

The public names are below; the README's "Layout" section maps the package and a frame's path through it.
"""

from . import cli  # noqa: F401 - first: under `python -m fused_stream.eval` a Ctrl-C while importing exits quietly
from .api import evaluate_long_context_loss
from .compat import PaperMetricsEvaluator, PaperMetricsLibriLight
from .core.config import EvalConfig
from .core.driver import ConstantMemoryError, StreamingEvaluator
from .core.graphs import GraphCaptureError, GraphMismatchError
from .core.parity import ParityError
from .core.reference import batch_losses, naive_streaming_losses
from .core.result import EvalResult
from .data.checkpoints import CheckpointError
from .data.models import load_model, load_model_and_mimi
from .measure.preflight import PreflightError
from .ttt.layer import attach_ttt
from .version import __version__

__all__ = [
    "CheckpointError",
    "ConstantMemoryError",
    "EvalConfig",
    "EvalResult",
    "GraphCaptureError",
    "GraphMismatchError",
    "PaperMetricsEvaluator",
    "PaperMetricsLibriLight",
    "ParityError",
    "PreflightError",
    "StreamingEvaluator",
    "__version__",
    "attach_ttt",
    "batch_losses",
    "evaluate_long_context_loss",
    "load_model",
    "load_model_and_mimi",
    "naive_streaming_losses",
]
