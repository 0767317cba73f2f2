"""What each flat key means: the definitions `metrics.compute_metrics` follows, beside those legacy code logged.

A fine-tuning dashboard logs these keys every N steps for weeks; their meaning must be readable in one place (the
README's table, results.json `metrics.flat_definitions`, the drop-in's `librilight_metrics_version`).
"""

from __future__ import annotations

__all__ = ["FLAT_DEFINITIONS", "FLAT_VERSION"]

# The flat keys' definitions: version 2 (this module); version 1 is what legacy paper-metrics code logged under the
# same names (a single position of a loss weighting codebook 0 by 100, a straight-line slope, 0.0 placeholders).
FLAT_VERSION = 2
FLAT_DEFINITIONS: dict[str, dict[str, str]] = {
    "librilight_loss_{n}k": {
        "definition": "mean of the per-position loss curve (weighted when codebook weights are set, else the "
                      "unweighted mean over audio codebooks) over the window of `window` frames centered on n*1000; "
                      "absent when the data does not cover that window",
        "legacy": "the averaged loss at the single position n*1000 (clamped to the shortest file), codebook 0 "
                  "weighted by 100; 0.0 when unavailable"},
    "librilight_loss_overall": {
        "definition": "the loss pooled over every valid (sequence, position), weighted like the curve; always "
                      "present",
        "legacy": "none"},
    "librilight_slope": {
        "definition": "least-squares slope of window means against ln(window center), windows centered in "
                      "[8000, T]; absent with fewer than 2 windows",
        "legacy": "(loss[end] - loss[8000]) / (end - 8000): a straight-line slope per frame between two single "
                  "positions; 0.0 when unavailable"},
    "librilight_slope_early": {
        "definition": "as librilight_slope, windows centered in [4000, 8000]",
        "legacy": "a straight-line slope over the same range; 0.0 when unavailable"},
    "librilight_slope_middle": {
        "definition": "as librilight_slope, windows centered in [8000, 16000]",
        "legacy": "a straight-line slope over the same range; 0.0 when unavailable"},
    "librilight_slope_late": {
        "definition": "as librilight_slope, windows centered in [16000, 24000]",
        "legacy": "a straight-line slope over the same range; 0.0 when unavailable"},
    "librilight_samples": {
        "definition": "sequences evaluated", "legacy": "sequences evaluated (0 on failure)"},
    "librilight_metrics_version": {
        "definition": f"{FLAT_VERSION}: these definitions", "legacy": "absent (version 1)"},
    "librilight_loss_{position}": {
        "definition": "not produced: single positions are noise; use librilight_loss_{n}k",
        "legacy": "the averaged loss at the single position `position` (1000, 2000, ...)"},
    "librilight_slope_overall / librilight_context_length / librilight_positions_measured": {
        "definition": "not produced: use librilight_slope, and results.json's frames and windows",
        "legacy": "a straight-line slope over all positions; the shortest file's length; positions measured"},
}
