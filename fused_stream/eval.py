"""`python -m fused_stream.eval`: stream a model over codes and print per-codebook losses.

With no arguments it evaluates the `tiny` preset on generated codes in frame and chunk mode and checks both
against the batch path (`LMModel.forward`), so a fresh install proves the exact driver works end to end.
Exit codes: 0 streaming equals the batch path, 1 it does not, 2 bad arguments or an unloadable model.
The full LibriLight CLI (audio, Mimi, metrics, reports) builds on this module.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .data import generate_codes
from .driver import EvalConfig, StreamingEvaluator
from .graphs import GraphCaptureError
from .models import PRESETS, load_model
from .preflight import PreflightError
from .reference import batch_losses
from .result import EvalResult


def build_parser() -> argparse.ArgumentParser:
    description = "\n\n".join(__doc__.split("\n\n")[:3])
    p = argparse.ArgumentParser(
        prog="python -m fused_stream.eval", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a moshi checkpoint path")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--generate", type=int, default=4, metavar="N", help="number of synthetic sequences")
    p.add_argument("--frames", type=int, default=200, help="frames per synthetic sequence")
    p.add_argument("--chunk-size", type=int, default=16, help="frames per step of the chunk-mode run (1 = frame only)")
    p.add_argument("--batch-size", type=_batch_size, default=0,
                   help="sequences per batch (0: all at once; auto: the most that fit in free memory)")
    p.add_argument("--loss-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="per-step loss: auto = fused Triton kernel on CUDA, torch twin on CPU "
                        "(triton on CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay each step as a CUDA graph (auto: on CUDA; on: fail if capture fails); "
                        "FUSED_STREAM_NO_CUDA_GRAPH=1 forces off")
    p.add_argument("--verify-graph", type=int, default=0, metavar="N",
                   help="check N graph replays against N eager steps bit for bit (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and codes")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the batch path (O(T^2) memory)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("generate", "frames", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.verify_graph < 0:
        parser.error("--verify-graph must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = None if args.device == "auto" else args.device
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        model = load_model(args.model, device=device, dtype=dtype, seed=args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # bad path, device, or no CUDA
        print(f"error: {exc}", file=sys.stderr)
        return 2
    codes = generate_codes(model, args.generate, args.frames, seed=args.seed)
    print(f"model {args.model}: context {model.context}, {model.num_codebooks} streams, device {model.device}, "
          f"{args.generate} x {args.frames} generated frames")
    chunk_sizes = [1] if args.chunk_size == 1 else [1, args.chunk_size]
    results = {}
    for chunk in chunk_sizes:
        config = EvalConfig(
            chunk_size=chunk, batch_size=args.batch_size or None, loss_backend=args.loss_backend,
            cuda_graphs=args.cuda_graphs, verify_graph=args.verify_graph, progress=args.progress,
        )
        try:
            evaluator = StreamingEvaluator(model, config)
        except (ValueError, RuntimeError) as exc:  # e.g. loss_backend='triton' on CPU without the interpreter
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            results[chunk] = evaluator.evaluate(codes)
        except (PreflightError, GraphCaptureError) as exc:  # the run cannot fit, or cuda_graphs="on" cannot capture
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _print_result(f"streaming C={chunk}", results[chunk])
    if args.no_check:
        return 0
    reference = batch_losses(model, codes)
    _print_result("batch (LMModel.forward)", reference)
    worst = 0.0
    for chunk, result in results.items():
        same_mask = all(
            torch.equal(a, b)
            for a, b in [
                (result.valid, reference.valid),  # the batch path's masks are LMModel.forward's own
                (result.text_valid, reference.text_valid),
                (result.losses.isnan(), reference.losses.isnan()),  # a NaN at a valid position is a failure
                (result.text_losses.isnan(), reference.text_losses.isnan()),
            ]
        )
        diff = float((result.losses - reference.losses).abs().nan_to_num(0).max())
        diff = max(diff, float((result.text_losses - reference.text_losses).abs().nan_to_num(0).max()))
        print(f"parity C={chunk}: masks identical: {same_mask}, max |streaming - batch| = {diff:.2e}")
        worst = max(worst, diff if same_mask else float("inf"))
    # Frame and chunk steps round differently from one whole-sequence forward in half precision.
    tolerance = 1e-4 if model.dtype.itemsize >= 4 else 1e-1
    if worst > tolerance:
        print(f"FAILED: streaming differs from the batch path by more than {tolerance}", file=sys.stderr)
        return 1
    return 0


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 or 'auto'")
    return value


def _print_result(name: str, result: EvalResult) -> None:
    means = result.mean_losses()
    per_codebook = " ".join(f"{means[f'audio_{k}']:.3f}" for k in range(result.losses.shape[1]))
    backend = result.report.get("loss_backend")
    if backend:
        name = f"{name} ({backend})"
    print(f"{name:>32}: {result.report['frames_per_second']:9.1f} frames/s | audio {means['audio']:.4f} "
          f"[{per_codebook}] | text {means['text']:.4f}")
    memory = result.report.get("memory")
    if memory:  # streaming runs: the monitor's verdict and the preflight estimate beside the measured peak
        estimate = result.report["preflight"]["estimate"]["run_bytes"]
        measured = result.report["preflight"]["measured_peak_increase_bytes"]
        print(f"{'':>32}  memory ({memory['memory_source']}): constant {memory['constant_memory']} "
              f"({memory['reason'] or 'flat after warm-up'}); run estimate {estimate / 2**20:.1f} MiB, measured "
              f"peak increase {_mib(measured)}; graphs: {result.report['cuda_graphs']['reason']}")


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
