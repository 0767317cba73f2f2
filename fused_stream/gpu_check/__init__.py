"""One command that proves the GPU claims: `python -m fused_stream.gpu_check` (see `run`)."""
