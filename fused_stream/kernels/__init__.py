"""Triton kernels and their torch twins (the fused cross-entropy arrives here)."""
