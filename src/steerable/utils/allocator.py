"""How glibc's malloc treats large freed buffers: give them back (a server) or keep them (a trainer).

glibc serves allocations over its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and unmaps
them on free. A training step on a CPU allocates and frees the same large tensors every step (the
logits over the vocabulary at every response position: 75-150 MB for 4 sequences of 192 response tokens
on SmolLM2), so each step page-faults them in again: measured in ``benchmarks/bench_policy.py``'s setting,
~150,000 minor page faults and ~0.5 s of system CPU per step. A server wants the opposite: memory a
request freed should go back to the system. Both are process-wide settings of the C allocator; they do
nothing where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):  # not glibc
        return False


def keep_freed_memory() -> bool:
    """For training processes: large buffers come from the heap and stay there once freed (no mmap, no
    trimming), so the next step reuses them without page faults. Peak RSS is unchanged (the same buffers
    are reused); memory is not returned to the system until the process ends."""
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """For servers: a fixed mmap threshold of 128 KiB, so that large buffers freed by requests (a user's
    pairs, the encoder's activations) go back to the system, and one malloc arena per CPU instead of 8
    (freed memory kept in many threads' arenas). glibc otherwise raises the threshold after each large
    free and keeps such buffers in its heaps: with 8 threads personalising users of 1,000 pairs, peak RSS
    was 1.26 GB with the defaults and 0.61 GB with the threshold alone."""
    return _mallopt((M_MMAP_THRESHOLD, 128 * 1024), (M_ARENA_MAX, max(2, os.cpu_count() or 2)))
