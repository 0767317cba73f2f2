"""`python -m fused_stream.eval`: teacher-forced loss at every frame of long audio, with metrics and reports.

With no arguments it is a synthetic demo: the `tiny` preset (random weights) on 4 generated sequences of 200
frames, on the CPU, checked against the batch path (`LMModel.forward`), with every output written to
./fused_stream_out/. On real data: give a checkpoint with --model, and --audio (LibriLight layout, tokenized with
a local Mimi checkpoint --mimi) or --codes (pre-tokenized codes files).

Outputs (--out): results.json (metrics, config, versions, timings, memory proof), per_position.csv, loss_curve.png,
and a summary table on stdout. Several --model options run on identical data and are compared side by side.
Exit codes: 0 done, 1 the parity check (--verify) failed, 2 bad input (nothing is written to --out then).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .data import DataError, load_sequences
from .driver import EvalConfig, StreamingEvaluator
from .graphs import GraphCaptureError
from .metrics import PositionSums, compute_metrics, position_means
from .models import PRESETS, count_parameters, load_model
from .parity import check_parity
from .preflight import PreflightError
from .report import ModelRun, environment_info, summary_table, write_reports
from .settings import DEMO_SEQUENCES, Settings, SettingsError, model_label, model_spec, parse_weights, resolve

log = logging.getLogger("fused_stream.eval")

DEMO_NOTE = (
    "This was a synthetic demo: random weights on generated codes, to show the tool works end to end. On a real "
    "model and LibriLight audio:\n  python -m fused_stream.eval --model PATH/TO/CHECKPOINT --audio LIBRILIGHT_DIR "
    "--mimi PATH/TO/MIMI.safetensors --concat-chapters --out results/"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_stream.eval", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", action="append", metavar="[LABEL=]SPEC",
                       help=f"a preset ({', '.join(PRESETS)}) or a local moshi checkpoint (a .safetensors file, or a "
                            "directory with config.json); repeat to compare models on identical data, e.g. "
                            "--model baseline=ckpt_a --model ttt=ckpt_b (default: tiny)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (default auto: cuda if available)")
    model.add_argument("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    data = p.add_argument_group("data (one source)")
    data.add_argument("--codes", metavar="PATH", help="a codes file (.pt, .npy, .safetensors) or a directory of "
                      "them, holding [8, T] audio codes or full [K, T] layouts")
    data.add_argument("--audio", metavar="DIR", help="audio files (.flac, .wav, .mp3, .ogg), e.g. LibriLight "
                      "speaker/book/chapter.flac; tokenized with --mimi, cached (see --cache-dir)")
    data.add_argument("--mimi", metavar="PATH", help="local Mimi checkpoint for --audio (.safetensors, or a directory "
                      "with config.json); its codebooks and card must match the model")
    data.add_argument("--generate", type=int, metavar="N",
                      help=f"N synthetic sequences (the default, N={DEMO_SEQUENCES}, when no --codes/--audio is given)")
    data.add_argument("--frames", type=int, help="frames per synthetic sequence (default 200)")
    data.add_argument("--max-frames", type=int, metavar="N", help="crop every sequence to its first N frames")
    data.add_argument("--max-files", type=int, metavar="N", help="evaluate only the first N sequences")
    data.add_argument("--concat-chapters", action="store_true", default=None,
                      help="join each LibriLight book's chapters in order into one long sequence")
    data.add_argument("--text-fill", help="text stream for audio-only data: zero (the zero token -1, never scored; "
                      "default) or pad (the model's text padding id, scored as text)")
    data.add_argument("--other-fill", help="the user's audio stream for audio-only data: zero (default) or copy "
                      "(the same codes)")
    data.add_argument("--cache-dir", metavar="DIR", help="where Mimi codes are cached, keyed by file content, Mimi "
                      "checkpoint and codebook count (default OUT/cache); reruns skip encoding")
    run = p.add_argument_group("evaluation")
    run.add_argument("--chunk-size", type=int, help="frames per step: 1 = frame mode, the deployment semantics "
                     "(default); C > 1 = exact chunk mode, faster")
    run.add_argument("--batch-size", type=_batch_size, help="sequences per batch, or auto (default): the most that "
                     "fit in free memory")
    run.add_argument("--loss-backend", help="auto (fused Triton kernel on CUDA, torch on CPU), torch, triton")
    run.add_argument("--cuda-graphs", help="auto (on CUDA), on (fail if capture fails), off")
    run.add_argument("--window", type=int, help="window of the window means and flat keys, in frames (default 1000)")
    run.add_argument("--codebook-weights", type=_weights, metavar="W0,W1,...",
                     help="also report a weighted combined loss, e.g. 100,1,1,1,1,1,1,1 (moshi-finetune's weighting)")
    run.add_argument("--verify", action=argparse.BooleanOptionalAction, help="check the losses against the batch path "
                     "(LMModel.forward) on a prefix that fits; on by default for generated data")
    run.add_argument("--verify-frames", type=int, metavar="N", help="the parity prefix (default 256 frames)")
    run.add_argument("--assert-constant-memory", action="store_true", default=None,
                     help="fail when the memory monitor sees memory grow with frames")
    run.add_argument("--seed", type=int, help="seed of random weights and generated codes (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output directory (default ./fused_stream_out)")
    out.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (CLI options win); accepts the "
                     "paper_metrics.librilight_streaming block (enabled, memory_check, cache_clear_interval, "
                     "max_sequence_length, ttt_verification)")
    out.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="only errors and paths")
    out.add_argument("-v", "--verbose", dest="verbosity", action="count", help="more log lines (-vv: debug)")
    return p


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {text!r}") from None


def _weights(text: str) -> list[float]:
    try:
        return parse_weights(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve(args)
    except SettingsError as exc:
        return _fail(exc)
    _setup_logging(settings.verbosity)
    if not settings.enabled:
        print("long-context evaluation disabled by the config (enabled: false)")
        return 0
    try:
        runs, data, parity_ok = _evaluate(settings)
    except (DataError, PreflightError, GraphCaptureError, SettingsError, FileNotFoundError, ValueError,
            RuntimeError) as exc:  # bad input, a run that cannot fit, a model that cannot be captured with "on"
        return _fail(exc)
    paths = write_reports(settings.out, runs, config=settings.as_dict(), data=data, seed=settings.seed,
                          environment=environment_info(runs[0].driver_report.get("device", "cpu")))
    if settings.verbosity >= 0:
        print(summary_table(runs))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if settings.synthetic and settings.verbosity >= 0:
        print(DEMO_NOTE)
    if not parity_ok:
        print("FAILED: streaming differs from the batch path (see 'parity' in results.json)", file=sys.stderr)
        return 1
    return 0


def _evaluate(s: Settings) -> tuple[list[ModelRun], list[dict[str, Any]], bool]:
    """Every model on the same sequences, one model in memory at a time."""
    runs, sequences, data, parity_ok = [], None, [], True
    for entry in s.model:
        label, spec = model_label(entry), model_spec(entry)
        device = None if s.device == "auto" else s.device
        dtype = None if s.dtype == "auto" else getattr(torch, s.dtype)
        model = load_model(spec, device=device, dtype=dtype, seed=s.seed)
        if sequences is None:
            sequences = _load_data(s, model)
            data = [{"name": q.name, "frames": q.frames, "sources": q.sources} for q in sequences]
        else:
            _check_same_layout(model, sequences[0].codes, label)
        log.info("model %s (%s): %s parameters, context %d, on %s", label, spec, f"{count_parameters(model):,}",
                 model.context, model.device)
        config = EvalConfig(
            chunk_size=s.chunk_size, batch_size=s.batch_size, loss_backend=s.loss_backend,
            cuda_graphs=s.cuda_graphs, assert_constant_memory=s.assert_constant_memory,
            progress=s.progress and s.verbosity >= 0,
        )
        codes = [q.codes for q in sequences]
        result = StreamingEvaluator(model, config).evaluate(codes)
        report = dict(result.report, device=str(model.device), dtype=str(model.dtype).removeprefix("torch."))
        if s.verify if s.verify is not None else s.synthetic:
            parity = check_parity(model, codes, result, frames=s.verify_frames)
            report["parity"] = parity.as_dict()
            parity_ok &= parity.passed
            log.info("parity vs LMModel.forward on the first %d frames: max |diff| %.2e, masks identical %s -> %s",
                     parity.frames, parity.max_abs_diff, parity.masks_identical, "ok" if parity.passed else "FAILED")
        sums = PositionSums.from_result(result)
        metrics = compute_metrics(sums, context=model.context, window=s.window, codebook_weights=s.codebook_weights)
        curves = position_means(sums, s.codebook_weights)
        runs.append(ModelRun(label=label, spec=spec, parameters=count_parameters(model), context=model.context,
                             metrics=metrics, curves=curves, driver_report=report))
        del model, result
        gc.collect()
    return runs, data, parity_ok


def _load_data(s: Settings, model: Any) -> list:
    cache_dir = s.cache_dir or str(Path(s.out) / "cache")
    sequences = load_sequences(
        model, codes=s.codes, audio=s.audio, mimi=s.mimi,
        generate=(s.generate or DEMO_SEQUENCES) if s.synthetic else None, frames=s.frames,
        max_frames=s.max_frames, max_files=s.max_files, concat_chapters=s.concat_chapters, text_fill=s.text_fill,
        other_fill=s.other_fill, cache_dir=cache_dir, seed=s.seed, device=model.device,
        progress=s.progress and s.verbosity >= 0,
    )
    if not sequences:
        raise DataError("no sequences to evaluate")
    return sequences


def _check_same_layout(model: Any, codes: torch.Tensor, label: str) -> None:
    if codes.shape[0] != model.num_codebooks:
        raise SettingsError(f"model {label} has {model.num_codebooks} streams but the data was laid out for "
                            f"{codes.shape[0]}: models compared side by side must share the stream layout")


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _fail(exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
