"""CPU runs: make glibc keep freed memory for the next step instead of returning it to the system."""

from __future__ import annotations


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: one malloc arena, no mmap'd chunks, no trimming. Returns
    whether glibc took all three settings (False elsewhere, e.g. macOS or musl).

    On CPU, XLA mallocs a step's temporaries afresh each call; by default glibc maps the large ones fresh and
    unmaps them after, so every step page-faults them in again. With this (the process-wide form of
    `bench.HEAP_REUSE`) steps are faster and the steady peak larger (fragmentation is kept, not returned):
    the bench's `settings` section measures both (docs/bench.md).
    Call it first, before jax starts threads: arenas that already exist stay."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>; a trim threshold of -1: never
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
