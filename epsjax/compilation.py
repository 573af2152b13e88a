"""Bounded compilation: shape buckets for request shapes, a persistent compilation cache, and a compile counter.

Every new (batch, prompt length, cache length) an engine sees compiles new programs. `ShapeBuckets` rounds those
up to short ladders (padding masked exactly as before, so outputs do not change), which bounds the programs a
model can ever compile: `ShapeBuckets.program_bound(max_seq_len, max_batch)`. `enable_compilation_cache` points
JAX's persistent compilation cache at a directory, so a second process (including `epsjax generate`) loads the
programs instead of compiling them. `CompileCounter` counts the programs a block of code compiled (and those it
loaded from the persistent cache) through jax.monitoring.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile
import threading
import warnings

import jax

from epsjax.errors import EpsjaxError

CACHE_ENV = "EPSJAX_COMPILATION_CACHE"  # a directory, or "0" / "off" to disable the persistent cache
DEFAULT_CACHE_DIR = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "epsjax" / "jax"


class BucketError(EpsjaxError):
    """A ShapeBuckets ladder that cannot bound compilation (the message names the field, the value and the rule)."""


def _ladder_ok(values, name: str) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(not isinstance(v, int) or v < 1 for v in values) or list(values) != sorted(set(values)):
        raise BucketError(f"ShapeBuckets.{name} must be strictly increasing positive ints; got {values!r}")
    return values


@dataclasses.dataclass(frozen=True)
class ShapeBuckets:
    """Ladders request shapes are rounded up to.

    batch: batch sizes; a batch above the last is rounded up to a multiple of it.
    min_length: the smallest prompt / cache length; lengths are powers of two from it (a prompt of T tokens is
        left-padded to the smallest such length >= T, its cache to the smallest >= that + max_new_tokens).
    """

    batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    min_length: int = 16

    def __post_init__(self):
        _ladder_ok(self.batch, "batch")
        if not isinstance(self.min_length, int) or self.min_length < 1 or self.min_length & (self.min_length - 1):
            raise BucketError(f"ShapeBuckets.min_length must be a power of two >= 1; got {self.min_length!r}")

    def batch_size(self, batch: int, multiple: int = 1) -> int:
        """The bucket of a batch of `batch` rows, a multiple of `multiple` (the data-parallel degree)."""
        size = next((b for b in self.batch if b >= batch), None)
        if size is None:
            size = math.ceil(batch / self.batch[-1]) * self.batch[-1]
        return math.ceil(size / multiple) * multiple

    def length(self, tokens: int) -> int:
        """The bucket of a prompt (or cache) of `tokens` slots: the smallest power of two >= max(tokens,
        min_length)."""
        return max(self.min_length, 1 << max(0, math.ceil(math.log2(max(tokens, 1)))))

    def shapes(self, max_seq_len: int, max_batch: int, multiple: int = 1) -> list[tuple[int, int, int]]:
        """Every (batch, prompt length, cache length) generate can run for prompts and generations within
        max_seq_len and batches up to max_batch."""
        batches = sorted({self.batch_size(b, multiple) for b in range(1, max_batch + 1)})
        lengths = sorted({self.length(t) for t in range(1, max_seq_len + 1)})
        out = []
        for t in lengths:
            caches = sorted({self.length(t + new) for new in range(1, max_seq_len + 1)})
            out += [(b, t, c) for b in batches for c in caches]
        return out

    def program_bound(self, max_seq_len: int, max_batch: int, multiple: int = 1) -> dict[str, int]:
        """The most programs of each kind an Engine's generate compiles per sampling setting: one prefill per
        (batch, prompt, cache) shape, one decode loop and one sampler per (batch, cache) and batch."""
        shapes = self.shapes(max_seq_len, max_batch, multiple)
        return {"prefill": len(shapes), "decode": len({(b, c) for b, _, c in shapes}),
                "sample": len({b for b, _, _ in shapes})}


class CompilationCacheWarning(UserWarning):
    """The persistent compilation cache directory cannot be used: the run goes on without it."""


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `directory` (default: $EPSJAX_COMPILATION_CACHE, else
    ~/.cache/epsjax/jax) and caches every program, however fast it compiled. Returns the directory, or None when
    $EPSJAX_COMPILATION_CACHE is "0" / "off" (the opt-out) or JAX already caches elsewhere.

    A directory that cannot be used (a file in its place or in its path, no permission to write, a full disk: a
    probe file is written and synced first) is a CompilationCacheWarning naming it and why, and None: the run
    compiles without the cache, never fails for it. (Entries that later fail to write or read are JAX's own
    warnings, also never errors.)"""
    setting = os.environ.get(CACHE_ENV, "")
    if directory is None and setting.lower() in ("0", "off", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    path = pathlib.Path(directory or setting or current or DEFAULT_CACHE_DIR).expanduser()
    if current and pathlib.Path(current).expanduser() != path:
        return None  # the user configured JAX's cache themselves: leave it
    problem = _unusable(path)
    if problem is not None:
        warnings.warn(f"{path}: the compilation cache directory cannot be used ({problem}); running without the "
                      "persistent compilation cache", CompilationCacheWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _unusable(path: pathlib.Path) -> str | None:
    """Why `path` cannot hold the cache (None: it can): made if absent, then a small probe file written, synced
    (a full disk fails here, not at the first cache entry) and removed."""
    if path.exists() and not path.is_dir():
        return "it exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".epsjax-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


class CompileCounter:
    """Counts XLA compilations (and persistent-cache loads) while active, with their seconds:

        with CompileCounter() as compiled:
            engine.generate(...)
        compiled.programs, compiled.seconds, compiled.cache_hits
    """

    _COMPILE = "/jax/core/compile/backend_compile_duration"
    _HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.programs = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._active = False

    def _on_duration(self, event: str, duration: float, **_):
        if self._active and event == self._COMPILE:
            with self._lock:
                self.programs += 1
                self.seconds += duration

    def _on_event(self, event: str, **_):
        if self._active and event == self._HIT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileCounter":
        self._active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        self._active = False
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
        return False


__all__ = ["CACHE_ENV", "CompilationCacheWarning", "CompileCounter", "ShapeBuckets", "enable_compilation_cache"]
