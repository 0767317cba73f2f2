"""Loss backends: one record per way of scoring a step, in one registry that every reader consults.

A backend is a `LossBackend` record (its name, a phrase for `--help`, whether it runs on a device, its step
function and the bytes that step allocates). The config's choices and help, `make_plan`'s resolution of
`loss_backend` (through `resolve_backend`), the CLI's checks and the preflight's memory estimate all read the
record, so a new backend is one module in this folder that calls `register` (found and imported below), its test
and a README line. A backend defined elsewhere (a test's, a user's) is added by calling `register` itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..cross_entropy import check_step_args

# (text_logits [B, 1, C, V_text], audio_logits [B, dep_q, C, V_audio], targets, delays, lengths, offset, out,
# counts, lead) -> None: the contract of kernels/cross_entropy.py's module docstring, arguments already checked.
StepFn = Callable[..., None]


@dataclass(frozen=True)
class LossBackend:
    name: str  # the value of loss_backend (and --loss-backend) that selects it
    summary: str  # a few words for --help: what it is
    step: StepFn
    unavailable: Callable[[torch.device], str | None]  # why it cannot run on a device (one line naming the fix)
    # Bytes one step allocates beyond its inputs and the loss buffer, given the step's logits (B * C * (text_card +
    # dep_q * card) elements) and their item size: the preflight adds them to the step's output phase.
    extra_bytes: Callable[[int, int], int]
    # "auto" picks, among the backends that run on the device and list its type here (None: every type), the one
    # with the highest priority; a negative priority is never picked by "auto".
    auto_devices: tuple[str, ...] | None = None
    auto_priority: int = 0


_REGISTRY: dict[str, LossBackend] = {}
AUTO = "auto"


def register(backend: LossBackend) -> LossBackend:
    """Add `backend` (a name already taken raises: two records for one name would make the choice ambiguous)."""
    if backend.name == AUTO or backend.name in _REGISTRY:
        raise ValueError(f"loss backend name {backend.name!r} is taken")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend registered at run time (a test's)."""
    del _REGISTRY[name]


class _Choices(Sequence[str]):
    """"auto" and every registered name, read when asked (so a backend registered later is a valid choice too)."""

    def _names(self) -> tuple[str, ...]:
        return (AUTO, *_REGISTRY)

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


LOSS_BACKENDS: Sequence[str] = _Choices()


def loss_backend(name: str) -> LossBackend:
    """The record of a resolved backend name ("auto" is not one: see `resolve_backend`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss backend {name!r}: use one of {', '.join(_REGISTRY)}") from None


def resolve_backend(name: str, device: torch.device, *, planned: bool = False) -> str:
    """Resolve `loss_backend` (one of LOSS_BACKENDS) for `device` to a registered name, or raise saying what to do:
    ValueError for a name that is not a choice, RuntimeError for a backend that cannot run on `device`.

    `planned`: the run happens elsewhere (a preflight of a `meta` model for a GPU), so what this process can run
    (triton installed, TRITON_INTERPRET set) does not decide; "auto" is what it picks where every backend runs."""
    device = torch.device(device)
    if name not in LOSS_BACKENDS:
        raise ValueError(f"loss_backend must be one of {', '.join(LOSS_BACKENDS)}, got {name!r}")
    if name == AUTO:
        candidates = [b for b in _REGISTRY.values() if b.auto_priority >= 0
                      and (b.auto_devices is None or device.type in b.auto_devices)
                      and (planned or b.unavailable(device) is None)]
        if not candidates:
            raise RuntimeError(f"no loss backend runs on {device}: name one with loss_backend")
        return max(candidates, key=lambda b: b.auto_priority).name  # first registered among equals
    reason = None if planned else _REGISTRY[name].unavailable(device)
    if reason is not None:
        raise RuntimeError(reason)
    return name


def backends_help() -> str:
    """The --loss-backend help: what "auto" picks on CPU and CUDA, then each backend."""
    picks = ", ".join(f"{_REGISTRY[resolve_backend(AUTO, torch.device(t))].summary} on {t.upper()}"
                      for t in ("cuda", "cpu") if _auto_resolves(t))
    return ", ".join([f"{AUTO} ({picks})", *_REGISTRY])


def _auto_resolves(device_type: str) -> bool:
    try:
        resolve_backend(AUTO, torch.device(device_type))
    except RuntimeError:
        return False
    return True


for _module in pkgutil.iter_modules(__path__):  # the built-in backends: every module of this folder
    importlib.import_module(f"{__name__}.{_module.name}")


def step_cross_entropy_(
    text_logits: torch.Tensor,  # [B, 1, C, V_text]
    audio_logits: torch.Tensor,  # [B, dep_q, C, V_audio]
    targets: torch.Tensor,  # [B, 1 + dep_q, C] int64, channel order (text first)
    delays: torch.Tensor,  # [1 + dep_q] int64, device
    lengths: torch.Tensor,  # [B] int64, device: frames of each sequence
    offset: torch.Tensor,  # [] int64, device: delayed step index of frame 0 of the chunk
    out: torch.Tensor,  # [B, 1 + dep_q, T_out] float32, device: written at lead + t
    counts: torch.Tensor,  # [3] int64, device: accumulated
    lead: int,
    backend: str = "torch",
) -> None:
    """Score one step in place with the registered loss backend `backend` (below). Never reads a device
    value on the host."""
    step = loss_backend(backend).step  # before the checks: an unknown name is the first thing to say
    check_step_args(text_logits, audio_logits, targets, delays, lengths, offset, out, counts, lead)
    step(text_logits, audio_logits, targets, delays, lengths, offset, out, counts, lead)
