"""A model's report when some of its sequences were computed by an earlier, interrupted run (`--resume`).

Why: the driver reports only what it streamed this time. Each saved sequence keeps its own part of the report (the
session — the numbered run — that computed it, its TTT statistics) and each run that streamed saves its report
(`partials.PartialStore.save_session`), so the report of a resumed run is rebuilt from them: per sequence in data
order, labelled by name and marked `resumed` when an earlier run computed it; the run-level parts (throughput,
verification, memory, ...) are this run's, or the latest earlier run's when this one streamed nothing, with every
earlier run's report under `resumed.sessions`.
"""

from __future__ import annotations

from typing import Any

from .partials import entry_report


def row_ttt(ttt: dict[str, Any], index: int) -> dict[str, Any]:
    """Row `index` (of the lists of `TTTTracker.report()`, which hold one entry per sequence in streaming order)."""
    return {layer: {key: stats[key][index] for key in ("updates_applied", "relative_change")}
            for layer, stats in ttt.get("layers", {}).items()}


def resumed_report(report: dict[str, Any], entries: list[dict[str, Any]], sessions: dict[int, dict[str, Any]],
                   current: int | None) -> dict[str, Any]:
    """`report` (this run's; `current` its session, None when it streamed nothing) completed from the saved
    `entries` (data order) and the saved `sessions` reports."""
    own = [entry_report(entry) for entry in entries]
    resumed = [part.get("session") != current or current is None for part in own]
    out = dict(report)
    if current is None:  # nothing streamed now: the run-level report is the latest earlier run's that finished,
        # else (every earlier run was interrupted, the last after saving its last sequence) the latest one's
        finished = [n for n, rep in sessions.items() if not rep.get("interrupted")] or list(sessions)
        if finished:
            out = {k: v for k, v in sessions[finished[-1]].items() if k != "sequences"} | out
            out["report_of_session"] = finished[-1]
    out["per_file"] = [{"name": entry["name"], "frames": entry["frames"], **entry["metrics"],
                        "session": part.get("session"), "resumed": flag}
                       for entry, part, flag in zip(entries, own, resumed, strict=True)]
    if any(resumed):
        used = sorted({part.get("session") for part, flag in zip(own, resumed, strict=True) if flag} - {None})
        out["resumed"] = {"sequences": sum(resumed), "sessions": {str(n): sessions.get(n) for n in used}}
    if any("ttt" in part for part in own):
        out["ttt"] = _ttt_per_sequence(entries, own, resumed)
    return out


def _ttt_per_sequence(entries: list[dict[str, Any]], own: list[dict[str, Any]], resumed: list[bool]) -> dict:
    """TTTTracker.report()'s layout, one entry per sequence in data order, labelled by `sequences` and `resumed`."""
    layers = sorted({layer for part in own for layer in part.get("ttt", {})})
    out = {}
    for layer in layers:
        stats = [part.get("ttt", {}).get(layer, {}) for part in own]
        change = [s.get("relative_change") for s in stats]
        out[layer] = {
            "sequences": [entry["name"] for entry in entries],
            "updates_applied": [s.get("updates_applied") for s in stats],
            "relative_change": change,
            "weights_changed": all(isinstance(r, float) and 0 < r < float("inf") for r in change),
            "resumed": list(resumed),
        }
    return {"layers": out}
