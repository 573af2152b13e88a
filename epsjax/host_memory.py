"""Host memory for XLA:CPU: keep freed memory in the process instead of returning it to the kernel.

XLA:CPU allocates every temporary of a program (an expert's weight slice, the hidden activations of the expert FFN)
with the C allocator at each call, and glibc serves large blocks with fresh mmap()s that it unmaps when they are
freed, so every call page-faults its temporaries in again: one expert FFN over a Mixtral-like expert (three
14.7 MB weight slices) took 13.4 ms and 10,782 minor page faults per call, and 3.3 ms and none with freed memory
kept (2 cores, glibc 2.36). :func:`keep_freed_memory` sets glibc's malloc to serve every block from one heap
(M_ARENA_MAX=1, M_MMAP_MAX=0) and to keep up to 2 GiB of freed memory mapped (M_TRIM_THRESHOLD), the way
PyTorch's and JAX's GPU allocators keep their pools. The price: the resident size stays near its peak.

It only takes effect before XLA's thread pools have made their own arenas, i.e. before the first jax
computation; `import epsjax` applies it then (EPSJAX_KEEP_FREED_MEMORY=0 turns it off), and the `epsjax`
command and the benchmark scripts import it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
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
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied
