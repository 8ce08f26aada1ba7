"""Floating-point settings shared by training and inference.

Arithmetic on subnormal floats (|x| < 1.2e-38 in float32) is many times slower on x86 CPUs. Issue 13
measured an NP-BTL training run slowing ~2.5× after step ~600 from them (1,000 steps: 37.5 s as they
are, 26.9 s flushed). Flushing them to zero does not change results: 1,000 steps at the paper's learning
rate gave bitwise-identical parameters with and without it (benchmarks/bench_core.py prints the per-step
time across such a run).

The mode is processor state of the calling thread (threads started meanwhile inherit it), seen by numpy
and every other library too. :func:`denormals_flushed` sets it only for the duration of a training run,
an evaluation, a personalisation call or a CLI command and then restores the caller's mode;
:func:`flush_denormals` sets it for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


def flushing_denormals() -> bool:
    """Whether this thread treats subnormal floats as zero right now."""
    with np.errstate(under="ignore"):
        return bool(np.float32(1e-37) / np.float32(1e3) == 0)  # 1e-40 is subnormal


def flush_denormals() -> bool:
    """Treat subnormal floats as zero from now on (this thread and threads it starts); returns whether the
    CPU supports it. Prefer :func:`denormals_flushed`, which restores the caller's mode."""
    import torch

    return bool(torch.set_flush_denormal(True))


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Treat subnormal floats as zero within the block (a no-op where the CPU cannot), then restore the
    caller's mode. Also a decorator: ``@denormals_flushed()``."""
    import torch

    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)
