"""fused_stream: exact, constant-memory teacher-forced evaluation of Moshi-architecture speech LMs.

The public names are below; the README's "Layout" section maps the package and a frame's path through it.
"""

import importlib
from typing import Any

from .version import __version__

# Public name -> the module that defines it, imported on first use (PEP 562): importing the package itself imports
# neither torch nor moshi, so `python -m fused_stream.gpu_check` can install moshi before anything needs it.
_PUBLIC = {
    "evaluate_long_context_loss": ".api",
    "PaperMetricsEvaluator": ".compat",
    "PaperMetricsLibriLight": ".compat",
    "EvalConfig": ".core.config",
    "ConstantMemoryError": ".engine.driver",
    "StreamingEvaluator": ".engine.driver",
    "GraphCaptureError": ".engine.graphs",
    "GraphMismatchError": ".engine.graphs",
    "ParityError": ".verify.parity",
    "batch_losses": ".verify.reference",
    "naive_streaming_losses": ".verify.reference",
    "EvalResult": ".core.result",
    "CheckpointError": ".data.checkpoints",
    "FusedStreamError": ".errors",
    "load_model": ".data.models",
    "load_model_and_mimi": ".data.models",
    "PreflightError": ".plan.preflight",
    "attach_ttt": ".ttt.layer",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    "CheckpointError",
    "ConstantMemoryError",
    "EvalConfig",
    "EvalResult",
    "FusedStreamError",
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
