"""`python -m fused_stream.eval`: teacher-forced loss at every frame of long audio, with metrics and reports.

With no arguments it is a synthetic demo: the `tiny` preset (random weights) on 4 generated sequences of 200
frames, on the CPU, with every output written to ./fused_stream_out/. On real data: give a model with --model (a
local checkpoint, or hf:ORG/NAME[,lora=...,config=...] resolved as moshi does; or moshi's own flags --hf-repo,
--lora-weight, --config-path, ...), and --audio (LibriLight layout, tokenized with the checkpoint's Mimi or --mimi)
or --codes (pre-tokenized codes files). Every run first checks a prefix of its data against the batch path
(`LMModel.forward`) and stops if the streamed losses differ (--no-verify skips that).

Outputs (--out): results.json (metrics, config, versions, timings, memory proof), per_position.csv, loss_curve.png,
and a summary table on stdout. Several --model options run on identical data and are compared side by side.
Every sequence is saved as soon as its batch is done, and the batch in progress every --checkpoint-every
seconds: --resume continues an interrupted run where it was saved; torchrun shards files.
Every input is checked before the first model loads (models, --ttt layers, codebook weights, data, a writable
--out, --resume against what the saved results were made with), and a run holds OUT/.lock while it writes there.
Exit codes: 0 done; 1 a model streams unlike its forward (the verification failed: nothing of it is reported),
a CUDA graph replay differs from eager, memory grew under --assert-constant-memory, or some files failed (0 with
--keep-going); 2 bad input, or --out in use by another run (nothing is written to --out then); 3 an internal error
(not the input: a bug, a CUDA or device fault; its traceback and the versions are printed: please report it);
130/143 interrupted by SIGINT/SIGTERM in any phase (the message says what is saved; rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import Field
from typing import Any

import torch
from moshi.models.loaders import DEFAULT_REPO

from ..core.config import ConfigError
from ..data.models import PRESETS
from ..engine.driver import ConstantMemoryError
from ..engine.graphs import GraphMismatchError
from ..errors import FusedStreamError, one_line
from ..options.settings import DEMO_SEQUENCES, EVAL_OPTIONS, resolve
from ..report.environment import available_cpus, environment_info, idle_cpus
from ..report.results import write_reports
from ..report.summary import summary_table
from ..stats.analysis import DEFAULT_B, DEFAULT_SEED
from ..stats.units import CLUSTERS
from ..verify.parity import ParityError
from .checks import check_run
from .crash import report_internal_error
from .distributed import World, gather, init_world
from .outlock import output_lock
from .partials import describe_saved
from .run import evaluate_run

log = logging.getLogger("fused_stream.eval")

DEMO_NOTE = (
    "This was a synthetic demo: random weights on generated codes, to show the tool works end to end. On a real "
    "model and LibriLight audio:\n  python -m fused_stream.eval --hf-repo kyutai/moshiko-pytorch-bf16 "
    "[--lora-weight RUN/consolidated/lora.safetensors --config-path RUN/consolidated/config.json] "
    "--audio LIBRILIGHT_DIR --concat-chapters --out results/"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_stream.eval", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", action="append", metavar="[LABEL=]SPEC",
                       help=f"a preset ({', '.join(PRESETS)}), a local moshi checkpoint (a .safetensors file, or a "
                            "directory with config.json), or a Hugging Face checkpoint resolved as moshi does: "
                            "hf:ORG/NAME[@REVISION][,moshi=PATH][,mimi=PATH][,tokenizer=PATH][,config=PATH]"
                            "[,lora=PATH][,fuse_lora=false] (the keys are moshi's flags below; PATH may be "
                            "hf://ORG/NAME/FILE). Repeat to compare models on identical data, e.g. --model "
                            "base=hf:kyutai/moshiko-pytorch-bf16 --model ft=hf:kyutai/moshiko-pytorch-bf16,"
                            "lora=RUN/consolidated/lora.safetensors,config=RUN/consolidated/config.json "
                            "(default: tiny)")
    model.add_argument("--ttt", action="append", metavar="LABEL:layers=L1,L2,mb=N",
                       help="attach a TTT-Linear layer to the model labelled LABEL, in temporal layers L1, L2, ... "
                            "with inner mini-batch N (optional lr=, alpha=); e.g. --model base=small --model ttt=small "
                            "--ttt ttt:layers=2,3,mb=16 compares a model with and without TTT on identical data")
    hub = p.add_argument_group(
        "one model as python -m moshi.server takes it (instead of --model; resolved by moshi's "
        "CheckpointInfo.from_hf_repo, from the Hugging Face cache when HF_HUB_OFFLINE=1)")
    hub.add_argument("--hf-repo", metavar="ORG/NAME", help=f"the repository (default {DEFAULT_REPO} when another of "
                     "these flags is given)")
    hub.add_argument("--moshi-weight", metavar="PATH", help="the LM weights instead of the repository's (e.g. a full "
                     "fine-tune's consolidated/consolidated.safetensors)")
    hub.add_argument("--mimi-weight", metavar="PATH", help="the checkpoint's Mimi instead of the repository's")
    hub.add_argument("--tokenizer", metavar="PATH", help="the text tokenizer instead of the repository's")
    hub.add_argument("--config-path", metavar="PATH", help="the config instead of the repository's config.json (e.g. "
                     "a moshi-finetune run's consolidated/config.json)")
    hub.add_argument("--lora-weight", metavar="PATH", help="LoRA adapters (moshi-finetune's "
                     "consolidated/lora.safetensors; needs a config with lora: true)")
    hub.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_const", const=False,
                     help="keep the LoRA adapters as separate layers (default: fused into the weights, as moshi does)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (default auto: cuda if available)")
    model.add_argument("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    data = p.add_argument_group("data (one source)")
    data.add_argument("--codes", metavar="PATH", help="a codes file (.pt, .npy, .safetensors) or a directory of "
                      "them, holding [8, T] audio codes or full [K, T] layouts")
    data.add_argument("--audio", metavar="DIR", help="audio files (.flac, .wav, .mp3, .ogg), e.g. LibriLight "
                      "speaker/book/chapter.flac; tokenized with the first model's checkpoint's Mimi or --mimi, cached "
                      "(see --cache-dir)")
    data.add_argument("--mimi", metavar="PATH", help="local Mimi checkpoint for --audio (.safetensors, or a directory "
                      "with config.json; default: the Mimi of the first model's Hugging Face checkpoint); its "
                      "codebooks and card must match every model")
    data.add_argument("--generate", type=int, metavar="N",
                      help=f"N synthetic sequences (the default, N={DEMO_SEQUENCES}, when no --codes/--audio is given)")
    data.add_argument("--frames", type=int, help="frames per synthetic sequence (default 200)")
    data.add_argument("--max-files", type=int, metavar="N", help="evaluate only the first N sequences")
    data.add_argument("--concat-chapters", action="store_true", default=None,
                      help="join each LibriLight book's chapters in order into one long sequence")
    data.add_argument("--allow-duplicates", action="store_true", default=None, help="evaluate every path even when "
                      "several hold identical content (a copy, a hard link); by default such a sequence counts once, "
                      "with a warning naming both")
    data.add_argument("--cache-dir", metavar="DIR", help="where Mimi codes are cached, keyed by file content, Mimi "
                      "checkpoint and codebook count (default OUT/cache); reruns skip encoding")
    run = p.add_argument_group("evaluation")
    for f in EVAL_OPTIONS.values():
        run.add_argument(f"--{f.name.replace('_', '-')}", help=f.metadata["help"], **_argument(f))
    run.add_argument("--seed", type=int, help="seed of random weights and generated codes (default 0)")
    run.add_argument("--min-frames", type=int, metavar="N", help="a sequence shorter than N frames is recorded as "
                     "failed instead of evaluated (default 1)")
    run.add_argument("--resume", action="store_true", default=None, help="skip the sequences whose results an "
                     "earlier run with the same settings saved in OUT/partial (each is saved when its batch ends)")
    run.add_argument("--keep-going", action="store_true", default=None, help="exit 0 even if some files failed "
                     "(they are listed under 'failed' in results.json either way)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (default: the CPUs this process "
                     "may use, from its affinity and cgroup quota, at most OMP_NUM_THREADS when set; a warning says "
                     "when other processes keep some busy); recorded in results.json")
    stats = p.add_argument_group("error bars and comparisons (a cluster bootstrap over units)")
    stats.add_argument("--cluster", choices=CLUSTERS, help="the unit of evidence that is "
                       "resampled: frames within one file are correlated, so files, books or speakers are, never "
                       "frames (default: book where the data names books, LibriLight's speaker/book layout or the "
                       ".json beside the audio, else file)")
    stats.add_argument("--bootstrap", type=int, metavar="B", help="resamples for the standard errors, 95%% intervals "
                       f"and paired comparisons (default {DEFAULT_B}; 0: none)")
    stats.add_argument("--bootstrap-seed", type=int, metavar="N",
                       help=f"seed of the resample matrix (default {DEFAULT_SEED}), recorded in the signature")
    stats.add_argument("--baseline", metavar="LABEL", help="the model every other model is compared with (default: "
                       "the first --model)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="output directory (default ./fused_stream_out)")
    out.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (CLI options win): options by "
                     "name, and a finetune config's LibriLight keys (paper_metrics.librilight_audio_dir, "
                     "librilight_streaming: enabled, memory_check, max_sequence_length, ...; see "
                     "fused_stream.options.settings)")
    out.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="only errors and paths")
    out.add_argument("-v", "--verbose", dest="verbosity", action="count", help="more log lines (-vv: debug)")
    return p


_METAVARS = {"max_frames": "N", "verify_frames": "N", "codebook_weights": "W0,W1,...", "checkpoint_every": "SECONDS"}


def _argument(f: Field) -> dict[str, Any]:
    """argparse keywords of an EvalConfig option; its value is checked with the other options, in `resolve`."""
    if isinstance(f.default, bool):  # on by default: --name / --no-name; off: --name
        return {"action": argparse.BooleanOptionalAction if f.default else "store_true", "default": None}
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
    """The command; its exit status. The package's own errors (`FusedStreamError`) exit with their documented
    status and one line; any other exception is a bug or a fault, never bad input: its traceback, the versions and
    exit 3 (`crash`)."""
    try:
        return _main(argv)
    except Exception as exc:  # noqa: BLE001 - not the package's own error: reported as the bug it is
        return report_internal_error(exc, "fused_stream.eval")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # -q / -v come from the command line only: logging is set before the config file is read, which logs its keys
    _setup_logging(0 if args.verbosity is None else args.verbosity)
    try:
        settings = resolve(args)
    except FusedStreamError as exc:
        return _fail(exc)
    if not settings.enabled:
        print("long-context evaluation disabled by the config (enabled: false)")
        return 0
    threads = set_threads(settings.threads)
    world = init_world(settings.device)
    started = False
    try:
        with _interruptible(), contextlib.ExitStack() as held:
            # Every input checked, on every rank, before anything is loaded or written; then rank 0 locks --out.
            checks = _agreed(world, lambda: check_run(settings, world))
            _agreed(world, lambda: held.enter_context(output_lock(settings.out, enabled=world.is_main)))
            started = True
            if checks.device.type == "cpu":
                warn_busy_cpus(threads)
            outcome = evaluate_run(settings, world, checks)
            if world.is_main:  # under the lock
                paths = write_reports(settings.out, outcome.runs, config=settings.as_dict(), data=outcome.data,
                                      seed=settings.seed, failed=outcome.failed,
                                      environment=environment_info(outcome.runs[0].driver_report.get("device", "cpu")),
                                      bootstrap=outcome.bootstrap, sequences=outcome.sequences)
    except (Interrupted, KeyboardInterrupt) as stop:  # KeyboardInterrupt: a SIGINT before our handler, or re-raised
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        if not started:
            print(f"interrupted ({name}) before the run started: nothing was evaluated or written", file=sys.stderr)
        else:
            print(f"interrupted ({name}): {describe_saved(settings.out)}", file=sys.stderr)
        return 128 + signum
    except (ParityError, GraphMismatchError, ConstantMemoryError) as exc:  # a verdict: the run is not to be trusted
        print(f"error: {exc}", file=sys.stderr)  # (a model streaming unlike its forward: no number of it reported)
        return 1
    except FusedStreamError as exc:  # bad input, a run that cannot fit, a model that cannot be captured, --out in use
        return _fail(exc)
    finally:
        world.close()
    if not world.is_main:
        return outcome.exit_code(settings)
    if settings.verbosity >= 0:
        print(summary_table(outcome.runs, outcome.bootstrap))
    for failure in outcome.failed:
        print(f"failed: {failure['name']}: {failure['reason']}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if settings.synthetic and settings.verbosity >= 0:
        print(DEMO_NOTE)
    return outcome.exit_code(settings)


class Interrupted(BaseException):
    """SIGINT / SIGTERM inside `main`. A BaseException, like KeyboardInterrupt: the `except Exception` that turns a
    bad file into a recorded failure (data loading, Mimi, caches, partial results) must never catch the user's stop."""

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


def set_threads(requested: int | None) -> int:
    """Size torch's CPU thread pool once, at start-up: `requested`, or `auto_threads()`. More threads than the CPUs
    this process may use are warned about (kept: the thread count changes the last bits of the losses): they wait
    on each other, 6.7x slower measured."""
    threads = requested if requested is not None else auto_threads()
    usable = available_cpus()
    if threads > usable:
        log.warning("--threads %d is more than the %d CPU(s) this process may use (its affinity and cgroup quota): "
                    "torch's threads will wait on each other and may run several times slower; --threads %d avoids "
                    "that", threads, usable, usable)
    torch.set_num_threads(threads)
    return threads


def warn_busy_cpus(threads: int) -> None:
    """With more threads than CPUs other processes leave idle, say so: that can cost 10-100x (one busy CPU of two:
    2 threads ran the demo 250x slower than 1)."""
    idle = idle_cpus() if threads > 1 else None
    if idle is not None and idle < threads - 0.5:
        free = max(1, math.floor(idle + 0.2))
        log.warning("%d threads, but only about %.1f of this process's CPUs are idle (other processes use the rest): "
                    "torch may run many times slower; --threads %d avoids that (the thread count is not picked from "
                    "the load, because it changes the last bits of the losses)", threads, idle, free)


def auto_threads() -> int:
    """The CPUs this process may use (`available_cpus`: affinity mask and cgroup quota, not the machine's count), at
    most OMP_NUM_THREADS when that is set. The same on every run of a machine, so the numbers are too."""
    threads = available_cpus()
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return threads
    return min(threads, omp) if omp >= 1 else threads


def _agreed(world: World, step: Any) -> Any:
    """`step()` on every rank; when it fails on any rank, it fails on all (no rank goes on to wait for the others
    in a collective that never comes). A world of one just runs it."""
    try:
        result, error = step(), None
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised as it was
        result, error = None, exc
    if error is not None and isinstance(error, OSError):
        error = ConfigError(one_line(error))  # a file that cannot be read or created: one line, exit 2
    messages = gather(None if error is None else one_line(error), world)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        raise ConfigError(f"rank {failed[0][0]}: {failed[0][1]}")
    return result


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _fail(exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
