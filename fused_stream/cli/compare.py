"""`python -m fused_stream.compare OUT_A OUT_B [...] --out DIR`: models of runs made separately, compared as one run.

Each OUT is a finished output folder of `python -m fused_stream.eval` (its results.json and partial/ folder). The
sequences of the runs are matched by the sha256 of their exact codes (saved with every sequence), not by name or
path: a sequence counts as the same only if every model saw the same tokens. A sequence that some model lacks is
refused, named, unless `--intersect` compares the sequences all models have (and says how many were dropped).
The metrics, error bars and comparisons are then computed exactly as one run evaluating all the models together
computes them (the same sums added in the same data order, the same units, the same resamples), and written to
`--out` in the same files: results.json, per_position.csv, per_sequence.csv, per_window.csv, loss_curve.png.
Exit codes: 0 done; 2 bad input (a folder without results, sequences that do not match, a bad option); 3 an internal
error (its traceback and the versions are printed: please report it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import FusedStreamError
from ..metrics import position_means
from ..report.environment import environment_info
from ..report.model_run import ModelRun
from ..report.results import RESULTS_JSON, write_reports
from ..report.summary import summary_table
from ..stats.analysis import DEFAULT_B, DEFAULT_SEED
from ..stats.units import CLUSTERS
from .crash import report_internal_error
from .partials import partial_dir, read_saved
from .uncertainty import (
    BootstrapSettings,
    ModelSequences,
    bootstrap_models,
    pooled_metrics,
    sequence_tables,
    unit_ids,
)


class CompareError(FusedStreamError, ValueError):
    """Runs that cannot be compared: one line naming what and how to fix it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fused_stream.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="OUT", help="output folders of finished runs (results.json, partial/)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the comparison's files are written")
    p.add_argument("--intersect", action="store_true", help="compare the sequences every model has; without it, a "
                   "sequence that some model lacks is an error")
    p.add_argument("--baseline", metavar="LABEL", help="the model the others are compared with (default: the first)")
    p.add_argument("--cluster", choices=CLUSTERS, help="the unit resampled (default: book where the data names "
                   "books, else file)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_B, metavar="B", help=f"resamples (default {DEFAULT_B})")
    p.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, metavar="N",
                   help=f"seed (default {DEFAULT_SEED})")
    return p


def load_runs(paths: list[str], *, intersect: bool) -> tuple[list[ModelSequences], list[ModelRun], list[dict],
                                                               dict[str, Any]]:
    """Every model of every run, the sequences they share (in the first run's data order) and what was dropped."""
    models, sources = [], []
    for path in map(Path, paths):
        try:
            doc = json.loads((path / RESULTS_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise CompareError(f"{path} is not a finished output folder of python -m fused_stream.eval "
                               f"({RESULTS_JSON}: {exc})") from None
        for entry in doc.get("models") or []:
            label = entry["label"]
            if any(m.label == label for m in models):
                label = f"{path.name}/{label}"
            # the weights the run resolved (codebook_weights, or first_codebook_weight for its model)
            weights = (entry["metrics"].get("flat_definitions") or {}).get("codebook_weights",
                                                                           (doc.get("config") or {}).get(
                                                                               "codebook_weights"))
            model = ModelSequences(label, partial_dir(path, entry["label"]), entry["metrics"], weights)
            hashes = {}
            for d in doc.get("data") or []:
                saved = read_saved(model.directory, d["name"])
                if saved is not None:
                    hashes[saved["codes_sha256"]] = d
            models.append(model)
            sources.append((path, entry, hashes))
    if len(models) < 2:
        raise CompareError(f"{', '.join(paths)} hold {len(models)} model: give the output folders of 2 or more")
    reference = sources[0][2]
    shared = [sha for sha in reference if all(sha in hashes for _, _, hashes in sources)]
    dropped = {m.label: len(hashes) - len(shared) for m, (_, _, hashes) in zip(models, sources, strict=True)}
    if any(dropped.values()) and not intersect:
        label, count = next((label, n) for label, n in dropped.items() if n)
        model_hashes = next(h for m, (_, _, h) in zip(models, sources, strict=True) if m.label == label)
        first = next(d["name"] for sha, d in model_hashes.items() if sha not in shared)
        raise CompareError(f"{count} sequence(s) of {label} have no match by codes in every run (first: {first}); "
                           "compare the common ones with --intersect")
    data = [reference[sha] for sha in shared]
    for model, (_, _, hashes) in zip(models, sources, strict=True):
        model.names = {reference[sha]["index"]: hashes[sha]["name"] for sha in shared}
    runs = []
    for model, (path, entry, _) in zip(models, sources, strict=True):
        sums, model.metrics = pooled_metrics(model, data)
        runs.append(ModelRun(label=model.label, spec=entry.get("spec", ""), parameters=entry.get("parameters", 0),
                             context=entry["context"], metrics=model.metrics,
                             curves=position_means(sums, model.codebook_weights),
                             driver_report=dict(entry.get("report") or {}, run=str(path))))
    return models, runs, data, {"sequences": len(data), "dropped": dropped}


def main(argv: list[str] | None = None) -> int:
    """The command; its exit status: the package's own errors are one line and exit 2, anything else is a bug,
    reported as one (`crash`: traceback, versions, exit 3)."""
    try:
        return _main(argv)
    except Exception as exc:  # noqa: BLE001 - not the package's own error: reported as the bug it is
        return report_internal_error(exc, "fused_stream.compare")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.bootstrap < 0:
            raise CompareError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        models, runs, data, matched = load_runs(args.runs, intersect=args.intersect)
        settings = BootstrapSettings(args.cluster, args.bootstrap, args.bootstrap_seed, args.baseline)
        info = bootstrap_models(models, data, settings)
    except FusedStreamError as exc:  # CompareError, or a bad --baseline / --cluster (ConfigError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(matched["dropped"].values()):
        print("--intersect: compared the " + f"{matched['sequences']} sequences every model has; dropped " +
              ", ".join(f"{label}: {n}" for label, n in matched["dropped"].items()), file=sys.stderr)
    tables = sequence_tables(models, data, unit_ids(data, info["unit"])[0])
    config = {"compare": [str(Path(p)) for p in args.runs], "intersect": args.intersect, **matched}
    paths = write_reports(args.out, runs, config=config, data=data, seed=args.bootstrap_seed,
                          environment=environment_info("cpu"), bootstrap=info, sequences=tables)
    print(summary_table(runs, info))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
