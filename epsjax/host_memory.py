"""Host memory for XLA:CPU: keep freed memory in the process instead of returning it to the kernel.

XLA:CPU allocates every temporary of a program (an expert's weight slice, the hidden activations of the expert FFN)
with the C allocator at each call, and glibc serves large blocks with fresh mmap()s that it unmaps when they are
freed, so every call page-faults its temporaries in again: one expert FFN over a Mixtral-like expert (three
14.7 MB weight slices) took 13.4 ms and 10,782 minor page faults per call, and 3.3 ms and none with freed memory
kept (2 cores, glibc 2.36). :func:`keep_freed_memory` sets glibc's malloc to serve blocks under 256 MiB from one
heap (M_ARENA_MAX=1, M_MMAP_THRESHOLD) and to keep up to 2 GiB of freed memory mapped (M_TRIM_THRESHOLD), the way
PyTorch's and JAX's GPU allocators keep their pools. Blocks from 256 MiB up are still mapped and unmapped per use:
kept in the heap too, a large prefill's multi-GiB temporaries fragment it. Measured on a Qwen3-MoE-shaped model
(4 layers, 64 experts, d_model 1024; batch 16 x 2048-token prefill, then 16 decode steps at batch 16), peak
resident size / prefill / decode: glibc's defaults 12.3 GiB / 18.9 s / 2.25 s; every block kept 17.0 GiB /
14.1 s / 1.47 s (the heap fragments: a serving process would run out of memory); this setting 13.1 GiB / 18.4 s /
1.93 s. EPSJAX_HOST_MMAP_THRESHOLD (bytes) moves the threshold.

It only takes effect before XLA's thread pools have made their own arenas, i.e. before the first jax
computation, and it changes the whole process's allocator, so importing epsjax never applies it: a program calls
it first, as the `epsjax` command (cli.main) and the timing scripts (scripts/bench_*.py, profile_*.py, ...) do.
EPSJAX_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 256 * 2**20  # blocks from this size up are mapped and unmapped as glibc does by default
_applied: bool | None = None


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge and getattr(bridge, "_backends", None))


def keep_freed_memory() -> bool:
    """Configures glibc's malloc as the module docstring says; True when it did (now or before). False off glibc,
    when EPSJAX_KEEP_FREED_MEMORY=0, or once a jax backend has started (too late: threads have their arenas)."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("EPSJAX_KEEP_FREED_MEMORY", "1") == "0" or _backend_started():
        _applied = False
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        _applied = False
        return False
    threshold = int(os.environ.get("EPSJAX_HOST_MMAP_THRESHOLD", MMAP_THRESHOLD))
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied
