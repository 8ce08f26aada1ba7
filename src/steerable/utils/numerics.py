"""Floating-point settings shared by training and inference.

Arithmetic on subnormal floats (|x| < 1.2e-38 in float32) is many times slower on x86 CPUs. Issue 13
measured an NP-BTL training run slowing ~2.5× after step ~600 from them (1,000 steps: 37.5 s as they
are, 26.9 s flushed). Flushing them to zero does not change results: 1,000 steps at the paper's learning
rate gave bitwise-identical parameters with and without it (benchmarks/bench_core.py prints the per-step
time across such a run).
"""

from __future__ import annotations


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this CPU (process-wide; a no-op where unsupported).

    Called at the start of training, personalisation and scoring, and by the CLI. Returns whether the CPU
    supports it (x86 with SSE3).
    """
    import torch

    return bool(torch.set_flush_denormal(True))
