"""Peak resident memory and speed of one large prefill and decode under epsjax.host_memory's setting: run it once
per setting, each in a fresh process (the setting applies at import), on a checkpoint of bench_vs_transformers.py:

    EPSJAX_KEEP_FREED_MEMORY=0 .venv/bin/python scripts/check_host_memory.py qwen3_moe 16 2048   # glibc defaults
    .venv/bin/python scripts/check_host_memory.py qwen3_moe 16 2048                              # epsjax's setting
    EPSJAX_HOST_MMAP_THRESHOLD=2147483647 .venv/bin/python scripts/check_host_memory.py ...   # keep every block

Prints, after loading, two prefills of batch x length and two generate() calls of 16 decode steps: seconds,
resident size and peak resident size (GiB).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from epsjax import host_memory  # noqa: E402
from epsjax.checkpoint import load_checkpoint  # noqa: E402
from epsjax.engine import Engine, SamplingParams  # noqa: E402


def rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    host_memory.keep_freed_memory()  # before the first jax computation (EPSJAX_KEEP_FREED_MEMORY=0: not at all)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    family, batch, length = argv[0], int(argv[1]), int(argv[2])
    checkpoints = Path(os.environ.get("EPSJAX_BENCH_CHECKPOINTS", "/tmp/epsjax-bench-checkpoints"))
    engine = Engine(load_checkpoint(checkpoints / f"{family}-bench", dtype="float32", progress=False))
    tokens = np.random.default_rng(0).integers(3, 1000, (batch, length))
    print(f"keep_freed_memory applied: {host_memory._applied}; resident after loading {rss_gib():.2f} GiB")
    for _ in range(2):
        start = time.perf_counter()
        engine.prefill(tokens, cache_len=-(-(length + 18) // 64) * 64)[0].block_until_ready()
        print(f"prefill {time.perf_counter() - start:.2f} s, resident {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB")
    for _ in range(2):
        result = engine.generate(tokens.tolist(), max_new_tokens=17, sampling=SamplingParams(), stop_at_eos=False)
        print(f"decode {result.decode_seconds:.2f} s, resident {rss_gib():.2f} GiB, peak {peak_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
