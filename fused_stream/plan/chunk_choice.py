"""`chunk_size="auto"`: the chunk C of exact chunk mode, chosen when the sequence lengths are known.

Exact chunk mode with C >= T is one forward over the whole sequence (a ring of context + C - 1 slots, see
`engine/stream.py::enlarge_rings`), so every C gives the same losses (up to float reassociation) and the choice
is only about speed and memory. A step costs a fixed part (dispatch, per-step Python, small kernels) amortized over
C frames, plus attention of C queries over the whole ring (context + C - 1 slots): per frame, that term grows with
C, and past a few hundred frames it outweighs what the fixed part saves. Measured on the 2-core VM (`small`, fp32,
B=1, one thread, best of 3 rounds in which other processes used < 0.12 of the other core beyond the one they kept
busy; seconds for the whole sequence; two sessions, +-10 % between them):

    T=600:   C=16 0.84, 64 0.53-0.58, 120 0.42, 128 0.44-0.48, 150 0.41, 200 0.37-0.40, 256 0.59 (3 steps, 168
             padded frames), 300 0.40-0.42, 512 0.83 (2 steps, 424 padded), 600 0.46-0.52;
             batch path (LMModel.forward) 0.41-0.45
    T=3000:  C=16 4.46, 64 2.49, 128 2.22, 250 1.98, 256 2.12, 300 2.12, 512 2.22 (6 steps, 72 padded), 1000 2.37,
             3000 3.13; batch path 3.71

Per-frame cost is flat from C ~ 150 to ~500 and rises past it (C = T = 3000 is 1.5x slower than C = 250: each of
its frames attends over a ring of 5999 slots), and a padded frame in the last step costs as much as a real one
(T=600 at C=512 pays for 1024 frames). Hence the rule: at most `AUTO_CAP` = 256 frames per step, with the steps
balanced so the last one is nearly full (C = ceil(T / ceil(T / 256)): T=600 -> 3 steps of 200, not 256 + 256 + 88;
T=3000 -> 12 of 250), the fastest measured at both lengths: 1.4x C=64 at T=600 (1.3x at 3000), 1.1x the batch path
at T=600 (1.9x at 3000). Then the largest C the memory budget allows (`preflight.estimate_run_bytes` grows with C
through the ring and the step's activations): `small` at C=250 needs ~151 MiB (C=64 69 MiB, C=T=3000 1.36 GiB);
Moshi 7B 1.72 GiB per sequence (C=1 1.48 GiB), so an automatic batch size is ~15 % smaller than in frame mode.
Measured on a CPU: on a GPU the fixed part of a step is a kernel launch sequence (or one graph replay) and the best
C may be larger; the cap is one constant to revisit with GPU numbers.
"""

from __future__ import annotations

import math

from moshi.models.lm import LMModel

from .preflight import MemoryEstimate, check_fits, estimate_run_bytes

__all__ = ["AUTO_CAP", "balanced_chunk", "choose_chunk_size", "resolve_chunk_size"]

AUTO_CAP = 256  # frames per step past which a larger chunk stopped paying (module docstring)


def balanced_chunk(longest: int, cap: int, unroll: int = 1) -> int:
    """The smallest C covering `longest` frames in as few calls as C = `cap` would (calls of C * unroll frames):
    the same number of steps with the least padding in the last one."""
    calls = math.ceil(longest / (cap * unroll))
    return math.ceil(longest / (calls * unroll))


def choose_chunk_size(
    model: LMModel, longest: int, batch_size: int, available: int, *, cap: int = AUTO_CAP, unroll: int = 1,
    cuda_graphs: bool = False, safety: float = 0.85, source: str = "given limit", loss_backend: str = "auto",
) -> tuple[int, str]:
    """(C, why) for `chunk_size="auto"`: the balanced C <= min(cap, longest) (see `balanced_chunk`) whose run of
    `batch_size` sequences of up to `longest` frames fits in `safety * available` bytes, else the largest smaller C
    that fits (balanced again). PreflightError (check_fits' message) if not even C = 1 fits.

    `batch_size`: what the C must leave room for: the batch size asked for, or 1 when the batch size is "auto" (it
    then takes whatever memory the chosen C leaves)."""
    if longest < 1 or batch_size < 1 or cap < 1:
        raise ValueError(f"longest, batch_size and cap must be >= 1, got {longest}, {batch_size}, {cap}")

    def estimate(C: int) -> MemoryEstimate:
        frames = math.ceil(longest / (C * unroll)) * C * unroll  # the stream's capacity: whole calls
        return estimate_run_bytes(model, batch_size, C, frames, cuda_graphs=cuda_graphs, loss_backend=loss_backend)

    def fits(C: int) -> bool:
        return estimate(C).run_bytes <= safety * available

    best = balanced_chunk(longest, min(cap, longest), unroll)
    why = "capped" if longest > cap else "= longest sequence"
    if not fits(best):
        check_fits(estimate(1), available, source, safety=safety)  # not even frame mode fits: the usual error
        # Memory grows with C (ring, activations), so bisect the largest C that fits, then balance it.
        lo, hi = 1, best - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        best, why = balanced_chunk(longest, lo, unroll), "limited by memory"
    steps = math.ceil(longest / (best * unroll)) * unroll
    return best, (f"auto: C={best} ({why}, cap {cap}: {steps} step{'s' * (steps > 1)} for the longest sequence, "
                  f"{longest} frames; B={batch_size} needs {_gib(estimate(best).run_bytes)} of "
                  f"{_gib(available)} available, {source})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def resolve_chunk_size(requested: int | str, model: LMModel, longest: int, n_sequences: int,
                       batch_size: int | str | None, available: int, source: str, *, unroll: int = 1,
                       cuda_graphs: bool = False, loss_backend: str = "auto") -> tuple[int, str]:
    """(C, why) for EvalConfig.chunk_size `requested`: an int is kept as asked; "auto" is `choose_chunk_size` for
    the batch size the run will use (B = 1 for batch_size "auto": it fits itself to what C leaves)."""
    if requested != "auto":
        return int(requested), f"chunk_size={requested} as asked" + (" (frame mode)" if requested == 1 else "")
    B = 1 if batch_size == "auto" else min(n_sequences, batch_size or n_sequences)
    return choose_chunk_size(model, longest, B, available, unroll=unroll, cuda_graphs=cuda_graphs, source=source,
                             loss_backend=loss_backend)

