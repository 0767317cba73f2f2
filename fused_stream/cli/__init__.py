"""The command-line evaluator `python -m fused_stream.eval` (`main`), its settings, run, partial results and locks.

The library never imports this package; the entry points (`fused_stream/eval.py`, `fused_stream/compare.py`) do,
after installing the start-up Ctrl-C handler (`startup`).
"""
