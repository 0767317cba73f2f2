"""One evaluation run: every model over the same sequences, each sequence saved as soon as its batch is done.

`evaluate_run` loads the data once (this rank's share, bad files collected, not fatal), then for each model in turn:
skips the sequences an earlier run already saved (`--resume`), streams the rest (`driver`), saves each sequence's
per-position sums (`partials`), adds all of them in data order, adds the ranks together (`distributed`), and on
rank 0 turns the sums into metrics and curves (`metrics`) for the report (`report`).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..data.checkpoints import ResolvedHub
from ..data.codes import EvalSequence
from ..data.dataset import Dataset, load_dataset
from ..data.librilight import sequence_meta
from ..data.models import count_parameters, open_model
from ..engine.driver import StreamingEvaluator
from ..errors import DataError
from ..measure.monitor import warn_memory_growth
from ..metrics import TEXT, PositionSums, compute_metrics, metrics_of
from ..options.settings import DEMO_SEQUENCES, Settings, model_label, model_spec, parse_ttt
from ..report.model_run import ModelRun
from ..ttt.layer import attach_ttt
from ..ttt.tracker import ttt_hooks
from ..verify.parity import ParityError
from .distributed import World, all_reduce_sums, gather
from .partials import PartialStore, partial_dir
from .resumed_report import resumed_report, row_ttt
from .uncertainty import BootstrapSettings, ModelSequences, bootstrap_models, sequence_tables, unit_ids

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    runs: list[ModelRun]
    data: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    bootstrap: dict[str, Any] | None = None  # results.json's `bootstrap` block, with the `comparisons`
    sequences: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None  # per_sequence / per_window rows

    def exit_code(self, settings: Settings) -> int:
        return 1 if self.failed and not settings.keep_going else 0


def evaluate_run(s: Settings, world: World, checks: Any) -> RunOutcome:
    """Every model on the same sequences (this rank's share), one model in memory at a time.

    `checks` is the `RunChecks` that `cli.checks.check_run` returned for `s` before anything expensive: the device,
    dtype and fingerprints to use.
    """
    runs, dataset, failed = [], None, []
    for entry in s.model:
        label, spec = model_label(entry), model_spec(entry)
        model = open_model(checks.models[label].source, device=checks.device, dtype=checks.dtype, seed=s.seed)
        for ttt_label, options in (parse_ttt(e) for e in s.ttt):
            if ttt_label == label:  # the same weights plus TTT layers: baseline vs TTT on identical data
                attach_ttt(model, seed=s.seed, **options)
        if dataset is None:
            dataset = _load_data(s, model, world, checks.mimi)
            failed = list(dataset.failed)
        else:
            _check_same_layout(model, dataset, label)
        log.info("model %s (%s): %s parameters, context %d, on %s", label, spec, f"{count_parameters(model):,}",
                 model.context, model.device)
        sums, report, model_failed = _evaluate_model(s, world, model, label, checks.fingerprint(label),
                                                     dataset.sequences)
        warn_memory_growth(report, label, s.memory_check)
        source = checks.models[label].source
        if isinstance(source, ResolvedHub):
            report["checkpoint"] = source.describe()
        failed += model_failed
        sums = all_reduce_sums(sums, world)
        reports = gather(report, world)
        if world.is_main:
            metrics, curves = metrics_of(sums, context=model.context, window=s.eval.window,
                                         weights=s.eval.weights_for(model.dep_q))
            runs.append(ModelRun(label=label, spec=spec, parameters=count_parameters(model), context=model.context,
                                 metrics=metrics, curves=curves,
                                 driver_report=reports[0] if world.size == 1 else {"ranks": reports, **reports[0]}))
        del model
        gc.collect()
    data = sorted((d for part in gather(_data_list(dataset), world) for d in part), key=lambda d: d["index"])
    failed = sorted((f for part in gather(failed, world) for f in part), key=lambda f: f.get("index", -1))
    outcome = RunOutcome(runs, data, failed)
    if world.is_main:  # from the saved partials of every rank, as `python -m fused_stream.compare` reads them
        models = [ModelSequences(run.label, partial_dir(s.out, run.label), run.metrics,
                                 run.metrics["flat_definitions"]["codebook_weights"]) for run in runs]
        outcome.bootstrap = bootstrap_models(models, data, BootstrapSettings(s.cluster, s.bootstrap,
                                                                              s.bootstrap_seed, s.baseline))
        outcome.sequences = sequence_tables(models, data, unit_ids(data, outcome.bootstrap["unit"])[0])
    return outcome


def _evaluate_model(
    s: Settings, world: World, model: Any, label: str, fingerprint: dict[str, Any], sequences: list[EvalSequence]
) -> tuple[PositionSums, dict[str, Any], list[dict[str, Any]]]:
    """This rank's sequences through one model, each saved when its batch ends (the batch in progress every
    `checkpoint_every` seconds); sums added in data order. The report is this run's, with what earlier runs
    measured for the sequences they saved (`resumed_report`)."""
    store = _open_store(s, world, label, fingerprint)
    todo = [q for q in sequences if store.load(q.name, q.codes, q.sources) is None]
    if len(todo) < len(sequences):
        log.info("resume: %d of %d sequences already done for %s", len(sequences) - len(todo), len(sequences), label)
    report: dict[str, Any] = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                              "resumed_sequences": len(sequences) - len(todo)}
    failed, session = [], None
    if todo:
        session = store.new_session()
        hooks = ttt_hooks(model)
        done: list[str] = []

        def save(rows: list[int], result: Any) -> None:  # called by the driver as soon as a batch is done
            ttt = hooks["ttt"].report() if "ttt" in hooks else None  # small: a few numbers per layer and sequence
            for j, row in enumerate(rows):
                one = PositionSums.from_result(result.row(row))
                per_file = compute_metrics(one, context=model.context, window=s.eval.window)["overall"]
                own = {"session": session} | ({"ttt": row_ttt(ttt, j - len(rows))} if ttt is not None else {})
                store.save(todo[row].name, todo[row].codes, one, per_file, todo[row].sources, report=own)
                done.append(todo[row].name)

        config = replace(s.eval, progress=s.progress and s.verbosity >= 0)
        evaluator = StreamingEvaluator(model, config, hooks=hooks)
        try:  # the driver first checks a prefix against the batch path (EvalConfig.verify)
            result = evaluator.evaluate([q.codes for q in todo], on_batch=save, checkpoints=store)
        except ParityError as exc:  # nothing of this model is reported; its message names the file
            exc.args = (f"model {label}: {exc.describe(todo[exc.sequence].name)}",)
            raise
        except Exception:
            raise
        except BaseException:  # an interrupt (not an Exception): label what this run finished, then stop
            store.save_session(session, (evaluator.interrupted_report or {"interrupted": True}) | {"sequences": done})
            raise
        report = dict(result.report, **report)
        report.pop("ttt", None)  # rebuilt per sequence from the saved entries below, in data order
        store.save_session(session, {k: v for k, v in report.items() if k != "resumed_sequences"} | {"sequences": done})
        failed = [{"index": todo[row].index, "name": todo[row].name, "sources": todo[row].sources,
                   "reason": f"model {label}: {reason}"} for row, reason in sorted(result.failed.items())]
    names = [f"codebook_{k}" for k in range(model.dep_q)] + [TEXT]
    sums, entries = PositionSums.empty(names), []
    for q in sequences:  # data order, whether computed now or resumed: the same float64 additions either way
        entry = store.load(q.name, q.codes, q.sources)
        if entry is not None:
            sums = sums.add(store.sums(entry))
            entries.append(entry)
    return sums, resumed_report(report, entries, store.sessions(), session), failed


def _open_store(s: Settings, world: World, label: str, fingerprint: dict[str, Any]) -> PartialStore:
    """Rank 0 prepares OUT/partial/<label> (fresh, or checked for --resume) before the other ranks use it."""
    store = PartialStore(s.out, label, fingerprint, resume=s.resume) if world.is_main else None
    gather(None, world)  # a barrier
    return store or PartialStore(s.out, label, fingerprint, resume=True, rank=world.rank)


def _load_data(s: Settings, model: Any, world: World, mimi: Any) -> Dataset:
    cache_dir = s.cache_dir or str(Path(s.out) / "cache")
    dataset = load_dataset(
        model, codes=s.codes, audio=s.audio, mimi=mimi, invalid_tokens=s.eval.invalid_tokens,
        generate=(s.generate or DEMO_SEQUENCES) if s.synthetic else None, frames=s.frames,
        max_frames=s.eval.max_frames, max_files=s.max_files, concat_chapters=s.concat_chapters,
        text_fill=s.eval.text_fill, other_fill=s.eval.other_fill, cache_dir=cache_dir, seed=s.seed, device=model.device,
        progress=s.progress and s.verbosity >= 0, on_error="collect", min_frames=s.min_frames, shard=world.shard,
        selection=s.selection(), allow_duplicates=s.allow_duplicates,
    )
    good = sum(gather(len(dataset.sequences), world))
    if good == 0:  # nothing at all to evaluate: that is bad input, not a partial failure
        reasons = [f["reason"] for part in gather(dataset.failed, world) for f in part]
        raise DataError(reasons[0] if len(reasons) == 1 else f"no sequence could be loaded ({len(reasons)} failed; "
                        f"first: {reasons[0] if reasons else 'no data'})")
    return dataset


def _data_list(dataset: Dataset) -> list[dict[str, Any]]:
    return [{"index": q.index, "name": q.name, "frames": q.frames, "sources": q.sources,
             **sequence_meta(q.name, q.sources)} for q in dataset.sequences]


def _check_same_layout(model: Any, dataset: Dataset, label: str) -> None:
    streams = dataset.sequences[0].codes.shape[0] if dataset.sequences else model.num_codebooks
    if streams != model.num_codebooks:
        raise ConfigError(f"model {label} has {model.num_codebooks} streams but the data was laid out for "
                            f"{streams}: models compared side by side must share the stream layout")
