"""What a command does with an exception that is not one of the package's own errors (`FusedStreamError`).

Such an exception is a bug, of this package, of torch or moshi, or a fault of the CUDA driver or the device (a
device-side assert, an illegal memory access), or something of the machine (a disk that filled up, a file removed
under the run): never a mistake in the user's input, which the package names in a `FusedStreamError`. Reporting it
as bad input (exit 2, one line) would send the user hunting in their options and lose the traceback, so it gets
the whole traceback, one line with what a bug report needs (the versions of fused_stream, torch, moshi, triton,
CUDA and Python, and the device) and exit `INTERNAL_ERROR`.
"""

from __future__ import annotations

import sys
import traceback

from ..errors import one_line

INTERNAL_ERROR = 3  # exit status of an unexpected exception: 2 is bad input, 1 a failed verification


def report_internal_error(exc: BaseException, program: str) -> int:
    """Print `exc`'s traceback and the versions line to stderr; the exit status, `INTERNAL_ERROR`."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{program}: internal error ({type(exc).__name__}: {one_line(exc)[:200]}), not a problem found in the "
          "input; unless the traceback points at this machine (a full disk, a file removed), please report it with "
          f"the traceback above and this line: {versions_line()}", file=sys.stderr, flush=True)
    return INTERNAL_ERROR


def versions_line() -> str:
    """"fused_stream 0.1.0, torch 2.9.1, moshi 0.2.13, triton 3.5.1, CUDA 12.8, python 3.11.7, device NVIDIA H200
    (cuda:0)": from `report.environment` (the probes results.json records), each probe allowed to fail."""
    try:
        import torch

        from ..report.environment import environment_info

        # The CUDA device the run used, when it got that far; a crash before CUDA started is not the place to start it.
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_initialized() else "cpu"
        info = environment_info(device)
    except Exception as exc:  # noqa: BLE001 - the report of one error must not end in another
        return f"versions unavailable ({type(exc).__name__}: {exc})"
    parts = [f"{name} {info.get(key) or 'none'}" for name, key in (
        ("fused_stream", "fused_stream"), ("torch", "torch"), ("moshi", "moshi"), ("triton", "triton"),
        ("CUDA", "cuda"), ("python", "python"))]
    parts.append(f"device {info.get('device_name') or 'unknown'} ({info.get('device')})")
    return ", ".join(parts)
