"""Floating-point settings shared by training and inference.

Subnormal floats (|x| < 1.2e-38 in float32) are up to ~100× slower on x86 CPUs. With the paper's constant
learning rate (1e-4) an NP-BTL's training drifts into them after a few hundred steps and its steps became
~5× slower (27 -> 180 ms on the 2-core development machine, benchmarks/bench_core.py). Flushing them to
zero changes nothing measurable: the same 1,000-step run gave the same parameters to every printed digit.
"""

from __future__ import annotations


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this CPU (process-wide; a no-op where unsupported).

    Called at the start of training, personalisation and scoring, and by the CLI. Returns whether the CPU
    supports it (x86 with SSE3).
    """
    import torch

    return bool(torch.set_flush_denormal(True))
