"""The stdout summary: a fixed-width text table, one column per model, of the numbers a reader looks at first.

Absent or non-finite values show as "—" rather than failing or printing "nan": a run without text or without memory
samples still gets its table. A `librilight_loss_{8,16,24}k` row that no run reaches (sequences shorter than
8k, 16k or 24k frames) is left out rather than shown empty. "frames (total)" is the sum of the evaluated
sequences' lengths (from the per-file report), not the longest one.

Speed: the headline "frames/s (steady)" is the monitor's rate after warm-up (`throughput.steady_frames_per_second`),
what a long run sustains; "frames/s (overall)" beside it is frames / wall time of the whole run, stream opening,
CUDA-graph capture and compilation included, so it understates a long run's speed on a short one. A multi-rank run
shows the sum over its ranks (they run in parallel, on separate devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .model_run import ModelRun

_DASH = "—"  # the table's "not available" cell


def summary_table(runs: list[ModelRun], bootstrap: dict[str, Any] | None = None) -> str:
    """A fixed-width text table, one column per model, for stdout. Absent or non-finite values show as "—".

    With the bootstrap, headline numbers read `value ± stderr`, the signature follows the table, and with two or
    more models a comparison table (Δ, 95 % interval, p, wins k/N) follows it."""
    has_text = any("text" in (run.metrics.get("overall") or {}) for run in runs)
    rows: list[tuple[str, Callable[[ModelRun], str]]] = [
        ("frames (total)", lambda r: _fmt(total_frames(r), "{:,}")),
        ("sequences", lambda r: _fmt(r.metrics.get("n_sequences"), "{:,}")),
        ("loss combined", lambda r: _pm(r, "loss_combined", (r.metrics.get("overall") or {}).get("combined"), 4)),
    ]
    if has_text:
        rows.append(("loss text", lambda r: _pm(r, "loss_text", (r.metrics.get("overall") or {}).get("text"), 4)))
    for key in ("librilight_loss_8k", "librilight_loss_16k", "librilight_loss_24k"):
        def flat(r: ModelRun, key: str = key) -> str:
            return _pm(r, key, (r.metrics.get("flat") or {}).get(key), 4)

        if any(flat(run) != _DASH for run in runs):  # a row no run reaches says nothing
            rows.append((key, flat))
    rows.append(("librilight_slope",
                 lambda r: _pm(r, "librilight_slope", (r.metrics.get("flat") or {}).get("librilight_slope"), 5, "+")))
    if any(_uncertain(run, "per_unit_librilight_slope").get("value") is not None for run in runs):
        rows.append(("  per-unit slope", lambda r: _pm(r, "per_unit_librilight_slope", _uncertain(
            r, "per_unit_librilight_slope").get("value"), 5, "+")))
    rows += [
        ("frames/s (steady)", lambda r: _fmt(steady_frames_per_second(r), "{:,.1f}")),
        ("frames/s (overall)", lambda r: _fmt(overall_frames_per_second(r), "{:,.1f}")),
        ("peak memory", lambda r: _bytes((r.driver_report.get("memory") or {}).get("peak_bytes"))),
        ("constant memory", lambda r: _verdict((r.driver_report.get("memory") or {}).get("constant_memory"))),
        ("verified (frames)", lambda r: _verified(r.driver_report.get("verification"))),
    ]
    header = [""] + [run.label for run in runs]
    body = [[name] + [cell(run) for run in runs] for name, cell in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])

    rule = "  ".join("-" * w for w in widths)
    text = "\n".join([line(header), rule] + [line(row) for row in body])
    if bootstrap and bootstrap.get("signature"):
        text += f"\n± = bootstrap standard error; {bootstrap['signature']}"
    elif bootstrap and bootstrap.get("skipped"):
        text += f"\nno error bars: {bootstrap['skipped']}"
    if bootstrap and bootstrap.get("comparisons"):
        text += "\n\n" + comparison_table(bootstrap["comparisons"])
    return text


# The comparisons the summary shows (results.json has every window and stream too).
_HEADLINE = ("loss_combined", "loss_text", "librilight_loss_8k", "librilight_loss_16k", "librilight_loss_24k",
             "librilight_slope", "per_unit_librilight_slope", "slope_after_context")


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """Δ = model - baseline, its paired 95 % interval, p and wins k/N for the headline metrics."""
    shown = [c for key in _HEADLINE for c in comparisons if c["metric"] == key and c.get("delta") is not None]
    if not shown:
        return ""
    header = ["metric", "model", "Δ vs " + shown[0]["baseline"], "95 % interval", "p", "lower k/N"]
    body = []
    for c in shown:
        digits = 5 if "slope" in c["metric"] else 4
        ci = c.get("ci95")
        interval = f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else _DASH
        p = _DASH if c.get("p_value") is None else f"{c['p_value']:.3f}"
        body.append([c["metric"], c["model"], f"{c['delta']:+.{digits}f}", interval, p,
                     f"{c['wins']}/{c['n_units']}"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                   strict=True)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["p: paired bootstrap, two-sided; p < 0.05 means the models differ on these units, "
                               "not that one is better. lower k/N: units where the model's own value is lower."])


def _uncertain(run: ModelRun, key: str) -> dict[str, Any]:
    return (run.metrics.get("uncertainty") or {}).get(key) or {}


def _pm(run: ModelRun, key: str, value: Any, digits: int, sign: str = "") -> str:
    """`value ± stderr` when the run has a standard error for `key`, else the value."""
    cell = _fmt(value, f"{{:{sign}.{digits}f}}")
    stderr = _uncertain(run, key).get("stderr")
    if cell == _DASH or stderr is None or not math.isfinite(stderr):
        return cell
    return f"{cell} ± {stderr:.{digits}f}"


def total_frames(run: ModelRun) -> int | None:
    """Frames evaluated in all, over every sequence (and every rank); None when the run lists no per-file report."""
    reports = run.driver_report.get("ranks") or [run.driver_report]
    files = [f for report in reports if isinstance(report, dict) for f in (report.get("per_file") or [])]
    if not files:
        return None
    return sum(int(f.get("frames") or 0) for f in files)


def _rank_reports(run: ModelRun) -> list[dict]:
    reports = run.driver_report.get("ranks") or [run.driver_report]
    return [report for report in reports if isinstance(report, dict)]


def _summed(values: list[Any]) -> float | None:
    """The sum over ranks, or None when any rank lacks the value (a partial sum would be misread as the total)."""
    if not values or any(not _is_number(v) or not math.isfinite(v) for v in values):
        return None
    return float(sum(values))


def steady_frames_per_second(run: ModelRun) -> float | None:
    """frames/s after warm-up (the monitor's), summed over ranks; None when a report has no steady rate."""
    return _summed([(report.get("throughput") or {}).get("steady_frames_per_second") for report in _rank_reports(run)])


def overall_frames_per_second(run: ModelRun) -> float | None:
    """frames / wall time of the whole run (setup included), summed over ranks."""
    return _summed([report.get("frames_per_second") for report in _rank_reports(run)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return _DASH
    if not math.isfinite(value):
        return _DASH
    return spec.format(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        return _DASH
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _verified(report: Any) -> str:
    """What the check against LMModel.forward covered: frames per verified sequence and its share of the run's time
    ("40+40 (1.6%)"); "off" with --no-verify. A failed check never reaches the table: the run stops."""
    if not isinstance(report, dict):
        return _DASH
    if "skipped" in report:
        return "off"
    frames, share = report.get("frames") or [], report.get("fraction_of_run")
    cost = f" ({share:.1%})" if isinstance(share, float) and math.isfinite(share) else ""
    return "+".join(str(f) for f in frames) + cost if frames else _DASH


def _verdict(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "NO (grows)"
    return "unknown"  # None: too few samples after warm-up to judge (see monitor.constant_memory_check)
