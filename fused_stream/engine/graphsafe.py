"""A CPU-capable check that a model's streaming step can be captured in a CUDA graph and replayed.

A CUDA graph replays the device work of the captured step on the captured addresses, and nothing else. So three
things a module may do per step are silently lost on replay:

- change a Python value (an int counter, a float, a bool, the length of a list or dict it appends to): the change
  happens once, at capture, and never again;
- rebind a tensor attribute to a new tensor (`self.w = self.w + dw`) instead of updating it in place
  (`self.w.add_(dw)`): the replay keeps reading and writing the tensor that existed at capture;
- change a tensor's shape between steps: a graph has one shape per captured kernel.

`check_stream` runs a few steps of a loaded `Stream` (the unit the driver captures) and snapshots, between steps,
every module's attributes, parameters, buffers and streaming state (recursing into state objects such as moshi's
ring caches, and one level into containers: `patches/state_snapshot.py`). Every attribute that moves is a
`Finding`; the few moshi attributes known to move harmlessly carry the reason, and `unsafe()` keeps the rest.
"""

from __future__ import annotations

from typing import Any

from ..patches.state_snapshot import Finding, compare, harmless_reason, snapshot

# ------------------------------------------------------------------------------------------------------ the check


def check_stream(stream: Any, steps: int = 3) -> list[Finding]:  # `stream`: a loaded engine.stream.Stream
    """Run `steps` calls of a loaded `stream` (the unit a graph captures), snapshot the model between them, and
    report every attribute that moves; the stream is reset to the start of its batch afterwards.

    The driver runs this on its run's first stream before capturing it: the real batch, shape and backend, and no
    second copy of the model's streaming state.
    """
    model = stream.model
    modules = dict(model.named_modules())
    changes: dict[tuple[str, str, str], list[tuple[int, str, str]]] = {}
    stream.reset()  # the state a captured graph starts from
    before = snapshot(model)
    for index in range(1, steps + 1):
        stream.step()
        after = snapshot(model)
        for module, attribute, kind, old, new in compare(before, after):
            changes.setdefault((module, attribute, kind), []).append((index, old, new))
        before = after  # keeps the previous step's tensors alive (see Leaf)
    stream.reset()
    findings = []
    for (module, attribute, kind), moves in sorted(changes.items()):
        reason = harmless_reason(modules[module], attribute, kind) if module in modules else None
        findings.append(Finding(module, attribute, kind, _detail(kind, moves, steps), reason))
    return findings


def _detail(kind: str, moves: list[tuple[int, str, str]], steps: int) -> str:
    at = ", ".join(str(index) for index, _, _ in moves)
    chain = " -> ".join([moves[0][1]] + [new for _, _, new in moves])
    if kind == "rebound_tensor":
        return f"rebound to a new tensor at step {at} of {steps} (a replay keeps using the captured one)"
    if kind == "shape_change":
        return f"shape {chain} at step {at} of {steps} (a graph has fixed shapes)"
    return f"{chain} at step {at} of {steps} (a replay does not repeat Python-side changes)"
