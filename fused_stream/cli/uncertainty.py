"""Per-sequence results, error bars and paired comparisons of finished models, read back from their saved partials.

Everything here starts from what `partials` saved for each sequence (its PositionSums and codes hash), so a run
resumed with --resume, a torchrun run (rank 0 reads every rank's files) and `python -m fused_stream.compare` over
runs made on different days all get the same numbers from the same sequences.

Units (`--cluster`): `file` = each evaluated sequence; `book` = a speaker's reading of a book (`speaker/book`, from
LibriLight's layout or the .json beside the audio, see `data.librilight.sequence_meta`); `speaker`. The default is
`book` where the data names books, else `file`; a sequence whose data names no book (or speaker) is its own unit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..metrics import PositionSums, compute_metrics
from ..stats.analysis import DEFAULT_B, DEFAULT_SEED, ModelSample, analyse, annotate
from ..stats.units import CLUSTERS
from .partials import entry_path, read_saved

log = logging.getLogger(__name__)


@dataclass
class BootstrapSettings:
    cluster: str | None = None  # None: book where the data names books, else file
    B: int = DEFAULT_B  # 0: no bootstrap
    seed: int = DEFAULT_SEED
    baseline: str | None = None  # None: the first model


@dataclass
class ModelSequences:
    """Where one model's saved sequences are: its partial folder, and each data entry's name there (by index)."""

    label: str
    directory: Path
    metrics: dict[str, Any]  # its reported compute_metrics dict (context, window, frames inside)
    codebook_weights: Sequence[float] | None = None
    names: dict[int, str] = field(default_factory=dict)  # data index -> the sequence's name in its own run

    def name(self, entry: dict[str, Any]) -> str:
        return self.names.get(entry["index"], entry["name"])

    def has(self, entry: dict[str, Any]) -> bool:
        return entry_path(self.directory, self.name(entry)).exists()

    def sums(self, entry: dict[str, Any]) -> PositionSums:
        saved = read_saved(self.directory, self.name(entry))
        if saved is None:
            raise FileNotFoundError(f"{self.directory}: no saved result for {self.name(entry)}")
        return PositionSums.from_state_dict(saved["sums"])


def unit_ids(data: list[dict[str, Any]], cluster: str | None) -> tuple[list[str], str]:
    """Each data entry's unit under `cluster` (resolved: None -> book or file), and the cluster used."""
    if cluster is None:
        cluster = "book" if any(d.get("book") for d in data) else "file"
    if cluster not in CLUSTERS:
        raise ConfigError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {cluster!r}")
    ids, alone = [], 0
    for d in data:
        if cluster == "file":
            ids.append(d["name"])
            continue
        book, speaker = d.get("book"), d.get("speaker")
        unit = (f"{speaker}/{book}" if speaker else book) if cluster == "book" and book else (
            speaker if cluster == "speaker" else None)
        alone += unit is None
        ids.append(unit or f"file:{d['name']}")
    if alone:
        log.warning("--cluster %s: %d of %d sequences name no %s; each of them is its own unit", cluster, alone,
                    len(data), cluster)
    return ids, cluster


def _sample(model: ModelSequences, entries: list[dict[str, Any]], ids: list[str],
            metrics: dict[str, Any]) -> tuple[ModelSample, int]:
    order = list(dict.fromkeys(ids))
    members: dict[str, list[dict[str, Any]]] = {u: [] for u in order}
    for entry, unit in zip(entries, ids, strict=True):
        members[unit].append(entry)

    def load(u: int) -> PositionSums:  # the unit's sequences added in data order
        parts = members[order[u]]
        total = model.sums(parts[0])
        for entry in parts[1:]:
            total = total.add(model.sums(entry))
        return total

    return ModelSample(model.label, load, metrics, model.codebook_weights), len(order)


def pooled_metrics(model: ModelSequences, entries: list[dict[str, Any]]) -> tuple[PositionSums, dict[str, Any]]:
    """The pooled sums of `entries` (added in data order, as a run adds them) and their compute_metrics dict."""
    total = None
    for entry in entries:
        one = model.sums(entry)
        total = one if total is None else total.add(one)
    metrics = compute_metrics(total, context=model.metrics["context"], window=model.metrics["window"],
                              codebook_weights=model.codebook_weights)
    return total, metrics


def bootstrap_models(models: list[ModelSequences], data: list[dict[str, Any]], settings: BootstrapSettings,
                     ) -> dict[str, Any]:
    """Annotate every model's metrics with its uncertainty (in place) and return results.json's `bootstrap` block
    with the `comparisons` of each model with the baseline, paired on the sequences every model has."""
    labels = [m.label for m in models]
    baseline = settings.baseline or labels[0]
    if baseline not in labels:
        raise ConfigError(f"--baseline {baseline!r} is not a model of this run (models: {', '.join(labels)})")
    info: dict[str, Any] = {"B": settings.B, "seed": settings.seed, "baseline": baseline, "comparisons": []}
    present = [[d for d in data if m.has(d)] for m in models]
    common = [d for d in data if all(m.has(d) for m in models)]
    ids, cluster = unit_ids(common or data, settings.cluster)
    info["unit"] = cluster
    if settings.B < 1:
        info["skipped"] = "--bootstrap 0"
        return info
    if len(set(ids)) < 2:
        info["skipped"] = f"fewer than 2 units ({cluster}): nothing to resample"
        log.warning("no error bars: the data hold fewer than 2 units (--cluster %s)", cluster)
        return info
    same = all(len(p) == len(common) for p in present)
    if not same:  # each model's own error bars on its own sequences; the comparison on the common ones
        for model, own in zip(models, present, strict=True):
            own_ids = unit_ids(own, cluster)[0]
            sample, n = _sample(model, own, own_ids, model.metrics)
            found = analyse([sample], n, B=settings.B, seed=settings.seed, unit=cluster)
            annotate(model.metrics, found.uncertainty[model.label], n, found.signature)
        info["sequences_compared"] = len(common)
        info["sequences_dropped"] = {m.label: len(p) - len(common) for m, p in zip(models, present, strict=True)}
    if not common:
        return info
    samples = []
    for model in models:
        metrics = model.metrics if same else pooled_metrics(model, common)[1]
        sample, n_units = _sample(model, common, ids, metrics)
        samples.append(sample)
    found = analyse(samples, n_units, B=settings.B, seed=settings.seed, unit=cluster, baseline=baseline)
    if same:
        for model in models:
            annotate(model.metrics, found.uncertainty[model.label], n_units, found.signature)
    for model in models:
        for warning in model.metrics.get("warnings") or []:
            log.warning("model %s: %s", model.label, warning)
    info.update(signature=found.signature, n_units=n_units, method="paired cluster bootstrap",
                ci="percentile 95 %", comparisons=found.comparisons)
    return info


def sequence_tables(models: list[ModelSequences], data: list[dict[str, Any]], ids: list[str],
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """per_sequence.csv rows (one per model and sequence: source, speaker, book, unit, frames, overall losses,
    flat keys, slopes) and per_window.csv rows (model, sequence, window, stream, mean, count), from each sequence's
    own `compute_metrics`."""
    sequences, windows = [], []
    for model in models:
        for entry, unit in zip(data, ids, strict=True):
            if not model.has(entry):
                continue
            saved = read_saved(model.directory, model.name(entry))
            sums = PositionSums.from_state_dict(saved["sums"])
            own = compute_metrics(sums, context=model.metrics["context"], window=model.metrics["window"],
                                  codebook_weights=model.codebook_weights)
            row = {"model": model.label, "sequence": entry["name"], "index": entry["index"],
                   "source": ";".join(entry.get("sources") or []), "speaker": entry.get("speaker"),
                   "book": entry.get("book"), "unit": unit, "frames": sums.frames,
                   "codes_sha256": saved.get("codes_sha256")}
            row |= {f"loss_{k}": v for k, v in own["overall"].items()}
            row |= {k: v for k, v in own["flat"].items() if k != "librilight_samples"}
            row |= {f"slope_{k}": v for k, v in own["slopes"].items()}
            sequences.append(row)
            counts = sums.counts.numpy()
            for win in own["windows"]:
                a, b = win["start"], win["end"]
                for stream in ["combined", *(["weighted"] if "weighted" in win else []), *sums.names]:
                    count = win["count"] if stream in ("combined", "weighted") else \
                        int(counts[sums.names.index(stream), a:b].sum())
                    windows.append({"model": model.label, "sequence": entry["name"], "start": a, "end": b,
                                    "stream": stream, "mean": win[stream], "count": count})
    return sequences, windows
