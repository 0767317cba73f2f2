"""`python -m fused_stream.eval`: teacher-forced loss at every frame of long audio, with metrics and reports.

With no arguments it is a synthetic demo: the `tiny` preset (random weights) on 4 generated sequences of 200
frames, on the CPU, checked against the batch path (`LMModel.forward`), with every output written to
./fused_stream_out/. On real data: give a checkpoint with --model, and --audio (LibriLight layout, tokenized with
a local Mimi checkpoint --mimi) or --codes (pre-tokenized codes files).

Outputs (--out): results.json (metrics, config, versions, timings, memory proof), per_position.csv, loss_curve.png,
and a summary table on stdout. Several --model options run on identical data and are compared side by side.
Every sequence is saved as soon as its batch is done: --resume continues an interrupted run; torchrun shards files.
Exit codes: 0 done; 1 the parity check (--verify) failed or some files failed (0 with --keep-going); 2 bad input
(nothing is written to --out then); 130/143 interrupted by SIGINT/SIGTERM (rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import Field
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..core.graphs import GraphCaptureError
from ..data.models import PRESETS
from ..errors import DataError
from ..measure.preflight import PreflightError
from ..report.environment import environment_info
from ..report.results import write_reports
from ..report.summary import summary_table
from .distributed import init_world
from .run import evaluate_run
from .settings import DEMO_SEQUENCES, EVAL_OPTIONS, resolve

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
    model.add_argument("--ttt", action="append", metavar="LABEL:layers=L1,L2,mb=N",
                       help="attach a TTT-Linear layer to the model labelled LABEL, in temporal layers L1, L2, ... "
                            "with inner mini-batch N (optional lr=, alpha=); e.g. --model base=small --model ttt=small "
                            "--ttt ttt:layers=2,3,mb=16 compares a model with and without TTT on identical data")
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
    data.add_argument("--max-files", type=int, metavar="N", help="evaluate only the first N sequences")
    data.add_argument("--concat-chapters", action="store_true", default=None,
                      help="join each LibriLight book's chapters in order into one long sequence")
    data.add_argument("--cache-dir", metavar="DIR", help="where Mimi codes are cached, keyed by file content, Mimi "
                      "checkpoint and codebook count (default OUT/cache); reruns skip encoding")
    run = p.add_argument_group("evaluation")
    for f in EVAL_OPTIONS.values():
        run.add_argument(f"--{f.name.replace('_', '-')}", help=f.metadata["help"], **_argument(f))
    run.add_argument("--verify", action=argparse.BooleanOptionalAction, help="check the losses against the batch path "
                     "(LMModel.forward) on a prefix that fits; on by default for generated data")
    run.add_argument("--verify-frames", type=int, metavar="N", help="the parity prefix (default 256 frames)")
    run.add_argument("--seed", type=int, help="seed of random weights and generated codes (default 0)")
    run.add_argument("--min-frames", type=int, metavar="N", help="a sequence shorter than N frames is recorded as "
                     "failed instead of evaluated (default 1)")
    run.add_argument("--resume", action="store_true", default=None, help="skip the sequences whose results an "
                     "earlier run with the same settings saved in OUT/partial (each is saved when its batch ends)")
    run.add_argument("--keep-going", action="store_true", default=None, help="exit 0 even if some files failed "
                     "(they are listed under 'failed' in results.json either way)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output directory (default ./fused_stream_out)")
    out.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (CLI options win): options by "
                     "name, and a finetune config's LibriLight keys (paper_metrics.librilight_audio_dir, "
                     "librilight_streaming: enabled, memory_check, max_sequence_length, ...; see "
                     "fused_stream.cli.settings)")
    out.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="only errors and paths")
    out.add_argument("-v", "--verbose", dest="verbosity", action="count", help="more log lines (-vv: debug)")
    return p


_METAVARS = {"max_frames": "N", "codebook_weights": "W0,W1,..."}


def _argument(f: Field) -> dict[str, Any]:
    """argparse keywords of an EvalConfig option; its value is checked with the other options, in `resolve`."""
    if isinstance(f.default, bool):
        return {"action": "store_true", "default": None}
    kwargs: dict[str, Any] = {"choices": f.metadata["choices"], "metavar": _METAVARS.get(f.name)}
    parse = f.metadata["parse"]
    if parse is not None:
        def parse_arg(text: str) -> Any:
            try:
                return parse(text)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        parse_arg.__name__ = parse.__name__  # argparse names it in "invalid int value"
        kwargs["type"] = parse_arg
    return kwargs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve(args)
    except ConfigError as exc:
        return _fail(exc)
    _setup_logging(settings.verbosity)
    if not settings.enabled:
        print("long-context evaluation disabled by the config (enabled: false)")
        return 0
    world = init_world(settings.device)
    try:
        with _interruptible():
            outcome = evaluate_run(settings, world)
    except Interrupted as stop:
        print(f"interrupted ({stop}): every sequence finished so far is saved in {Path(settings.out) / 'partial'}; "
              "run the same command again with --resume to continue", file=sys.stderr)
        return 128 + stop.signum
    except (DataError, PreflightError, GraphCaptureError, ConfigError, FileNotFoundError, ValueError,
            RuntimeError) as exc:  # bad input, a run that cannot fit, a model that cannot be captured with "on"
        return _fail(exc)
    finally:
        world.close()
    if not world.is_main:
        return outcome.exit_code(settings)
    paths = write_reports(settings.out, outcome.runs, config=settings.as_dict(), data=outcome.data,
                          seed=settings.seed, failed=outcome.failed,
                          environment=environment_info(outcome.runs[0].driver_report.get("device", "cpu")))
    if settings.verbosity >= 0:
        print(summary_table(outcome.runs))
    for failure in outcome.failed:
        print(f"failed: {failure['name']}: {failure['reason']}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if settings.synthetic and settings.verbosity >= 0:
        print(DEMO_NOTE)
    if not outcome.parity_ok:
        print("FAILED: streaming differs from the batch path (see 'parity' in results.json)", file=sys.stderr)
    return outcome.exit_code(settings)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT / SIGTERM stop the run where it is: nothing new is finished, everything saved stays saved."""

    def stop(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _fail(exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
