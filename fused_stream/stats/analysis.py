"""Uncertainty of every headline number and paired comparisons between models, from their units' PositionSums.

`analyse` is what a run (or `python -m fused_stream.compare`) calls with its models on one list of units: it builds
each model's unit arrays, draws ONE resample matrix for all of them (`bootstrap.resample_matrix`, seeded), and
returns each model's `uncertainty` (value, stderr, ci95, n_units per statistic key) and, with two or more models,
each model's paired comparison with the baseline for every key both have. `annotate` writes a model's uncertainty
into its `compute_metrics` dict without changing a key that was there. `flat_stderr` gives the drop-in call's
`{flat key}_stderr` companions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import PositionSums
from ..version import __version__
from .bootstrap import Plan, point_values, resample_matrix, statistics, summarize, unit_values, window_key
from .paired import paired_test
from .units import build_units

__all__ = ["DEFAULT_B", "DEFAULT_SEED", "ModelSample", "Analysis", "analyse", "annotate", "signature", "flat_stderr"]

DEFAULT_B = 1000  # resamples, as sacrebleu and lm-evaluation-harness
DEFAULT_SEED = 12345  # sacrebleu's


@dataclass
class ModelSample:
    """One model's data on the run's units: `load_unit(u)` is unit u's PositionSums (sequences added in data order),
    `metrics` the `compute_metrics` dict of all units pooled (its reported values)."""

    label: str
    load_unit: Callable[[int], PositionSums]
    metrics: dict[str, Any]
    codebook_weights: Sequence[float] | None = None


@dataclass
class Analysis:
    signature: str
    uncertainty: dict[str, dict[str, dict[str, Any]]]  # label -> key -> {value, stderr, ci95, n_units}
    unit_values: dict[str, dict[str, np.ndarray]]  # label -> key -> [N] each unit's own value (NaN: none)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    plans: dict[str, Plan] = field(default_factory=dict)


def signature(*, unit: str, n_units: int, B: int, seed: int) -> str:
    """The bootstrap's signature string (sacrebleu's habit): what produced the intervals, to quote beside them."""
    return (f"method:paired-cluster-bootstrap|unit:{unit}|n_units:{n_units}|B:{B}|seed:{seed}|ci:percentile-95|"
            f"fused_stream:{__version__}")


def analyse(models: Sequence[ModelSample], n_units: int, *, B: int = DEFAULT_B, seed: int = DEFAULT_SEED,
            unit: str = "file", baseline: str | None = None) -> Analysis:
    """Every model's uncertainty on `n_units` units and, with >= 2 models, each one's comparison with `baseline`
    (default: the first model), on the same resamples."""
    if not models:
        raise ValueError("analyse needs at least one model")
    labels = [m.label for m in models]
    baseline = labels[0] if baseline is None else baseline
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not a model of this run (models: {', '.join(labels)})")
    W = resample_matrix(n_units, B, seed)
    result = Analysis(signature(unit=unit, n_units=n_units, B=B, seed=seed), {}, {})
    replicates, points = {}, {}
    for model in models:
        metrics = model.metrics
        units = build_units(model.load_unit, n_units, context=metrics["context"], window=metrics["window"],
                            codebook_weights=model.codebook_weights)
        plan = Plan.make(metrics["frames"], window=metrics["window"], context=metrics["context"])
        replicates[model.label] = statistics(units, W, plan)
        points[model.label] = point_values(metrics, units, plan)
        values = unit_values(units, plan)
        result.unit_values[model.label], result.plans[model.label] = values, plan
        result.uncertainty[model.label] = {
            key: summarize(points[model.label][key], replicates[model.label][key])
            | {"n_units": int(np.isfinite(values[key]).sum())}
            for key in points[model.label]
        }
        del units  # one model's arrays in memory at a time
    for label in labels:
        if label == baseline:
            continue
        for key in points[label]:
            if key not in points[baseline]:
                continue
            test = paired_test(points[label][key], points[baseline][key], replicates[label][key],
                               replicates[baseline][key], result.unit_values[label][key],
                               result.unit_values[baseline][key])
            result.comparisons.append({"model": label, "baseline": baseline, "metric": key,
                                       "model_value": _json(points[label][key]),
                                       "baseline_value": _json(points[baseline][key]), **test})
    return result


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def annotate(metrics: dict[str, Any], uncertainty: dict[str, dict[str, Any]], n_units: int, sig: str) -> None:
    """Add to a `compute_metrics` dict (no existing key changes): `uncertainty` (key -> value, stderr, ci95,
    n_units), `bootstrap` (the signature), `{key}_stderr` in `flat` beside each flat key, in each window
    `combined_stderr`, `combined_ci95` and `units` (how many units have a value there), and `warnings` when a
    reported slope uses windows fewer than half the units cover."""
    metrics["uncertainty"] = uncertainty
    metrics["bootstrap"] = sig
    # The pooled loss the flat keys follow is the statistic `loss_{curve}`.
    aliases = {"librilight_loss_overall": f"loss_{metrics.get('flat_definitions', {}).get('curve', 'combined')}"}
    for key in list(metrics["flat"]):  # the drop-in's companions: fine-tuning logs draw error bars from them
        stderr = (uncertainty.get(aliases.get(key, key)) or {}).get("stderr")
        if stderr is not None and not key.endswith("_stderr"):
            metrics["flat"][f"{key}_stderr"] = stderr
    for win in metrics["windows"]:
        entry = uncertainty.get(window_key(win["start"], win["end"])) or {}
        win["combined_stderr"], win["combined_ci95"] = entry.get("stderr"), entry.get("ci95")
        win["units"] = entry.get("n_units", 0)
    warnings = []
    plan = Plan.make(metrics["frames"], window=metrics["window"], context=metrics["context"])
    for key, idx in plan.slopes.items():
        if (uncertainty.get(key) or {}).get("value") is None:
            continue
        thin = [metrics["windows"][i] for i in idx
                if metrics["windows"][i]["combined"] is not None and 2 * metrics["windows"][i]["units"] < n_units]
        if thin:
            spans = ", ".join(f"{w['start']}-{w['end']}: {w['units']}" for w in thin[:4])
            more = f" and {len(thin) - 4} more" if len(thin) > 4 else ""
            warnings.append(f"{key} uses windows covered by fewer than half of the {n_units} units ({spans}{more}); "
                            "the pooled curve there averages other units than earlier (see per_unit_ slopes)")
    metrics["warnings"] = warnings


def flat_stderr(sequences: Sequence[PositionSums], unit_ids: Sequence[str], metrics: dict[str, Any], *,
                codebook_weights: Sequence[float] | None = None, B: int = DEFAULT_B,
                seed: int = DEFAULT_SEED) -> dict[str, float]:
    """`{key}_stderr` for every `librilight_*` loss and slope key of `metrics["flat"]` ({} with fewer than 2 units),
    from a cluster bootstrap over the units `unit_ids` (one per sequence); `metrics` (compute_metrics of the
    sequences pooled) is annotated as a run annotates it (`annotate`)."""
    if len(sequences) != len(unit_ids):
        raise ValueError(f"flat_stderr: {len(sequences)} sequences but {len(unit_ids)} unit ids")
    order = list(dict.fromkeys(unit_ids))
    if len(order) < 2 or B < 1:
        return {}
    members = {u: [s for s, v in zip(sequences, unit_ids, strict=True) if v == u] for u in order}

    def load(u: int) -> PositionSums:
        parts = members[order[u]]
        total = parts[0]
        for sums in parts[1:]:
            total = total.add(sums)
        return total

    found = analyse([ModelSample("model", load, metrics, codebook_weights)], len(order), B=B, seed=seed)
    annotate(metrics, found.uncertainty["model"], len(order), found.signature)
    return {key: value for key, value in metrics["flat"].items() if key.endswith("_stderr")}
