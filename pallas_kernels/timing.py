"""Best-of-N wall time of a jitted call, for the profilers and the GPU floor tests."""

from __future__ import annotations

import time

import jax


def best_seconds(fn, *args, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of ``fn(*args)`` after one warm-up call (compile).

    The minimum, not the median: the machines this runs on are shared, and interference only ever adds time.
    """
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best
