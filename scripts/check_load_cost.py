"""What the load-time checks of epsjax.checkpoint cost: load a checkpoint with them and without the per-tensor
finiteness check, alternately, and print the times (the header checks run in both: they replace the listing of
tensor names the loader always did).

    .venv/bin/python scripts/check_load_cost.py /tmp/epsjax-bench-checkpoints/mixtral-bench --repeats 3

Writes scripts/results/load_checks_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from epsjax import checkpoint  # noqa: E402
from epsjax.host_memory import keep_freed_memory  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402


def load_seconds(path: Path, check_finite: bool) -> float:
    original = checkpoint._count_nonfinite
    if not check_finite:
        checkpoint._count_nonfinite = lambda value: 0
    try:
        start = time.perf_counter()
        model = checkpoint.load_checkpoint(path, progress=False)
        jax.block_until_ready(jax.tree.leaves(model))
        return time.perf_counter() - start
    finally:
        checkpoint._count_nonfinite = original


def main(argv=None) -> int:
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "load_checks_cpu.json"))
    args = parser.parse_args(argv)
    size = sum(f.stat().st_size for f in args.checkpoint.glob("*.safetensors"))
    load_seconds(args.checkpoint, True)  # warm the page cache and compile the check
    times = {"with_checks": [], "without_finite_check": []}
    for _ in range(args.repeats):
        times["with_checks"].append(load_seconds(args.checkpoint, True))
        times["without_finite_check"].append(load_seconds(args.checkpoint, False))
    on, off = (statistics.median(times[k]) for k in ("with_checks", "without_finite_check"))
    result = {"checkpoint": str(args.checkpoint), "bytes": size, "commit": git_commit(), "cpus": os.cpu_count(),
              "seconds": times, "median_with_checks_s": on, "median_without_finite_check_s": off,
              "finite_check_overhead": on / off - 1}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.checkpoint} ({size / 2**20:.0f} MiB): load {on:.2f} s with every check, {off:.2f} s without the "
          f"finiteness check: {100 * (on / off - 1):+.1f}% (median of {args.repeats}, page cache warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
