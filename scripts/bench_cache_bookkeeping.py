"""Host bookkeeping of the offload cache engine at Qwen3-30B-A3B scale (48 MoE layers x 128 experts, top-8, batch 4,
25% of the experts in slots): milliseconds per decode step of a hit-ratio replay (instant copies, so the replay is
all bookkeeping), for LRU and for the predictor's prefetch. Routing is random with a noisy forecast: the cost depends
on the sizes, not on the routing's structure.

    python scripts/bench_cache_bookkeeping.py .                       # this checkout
    python scripts/bench_cache_bookkeeping.py /path/to/before . --out scripts/results/offload_host_overhead_cpu.json

With several checkouts (e.g. a git worktree of an older commit, then this one) each is measured in its own
subprocess, one after the other in this one run, and the ratios to the first are printed (and stored under
"bookkeeping_at_qwen3_scale" in --out, with each checkout's commit).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def measure() -> dict:
    import numpy as np

    try:
        from epsjax.host_memory import keep_freed_memory
    except ImportError:  # a checkout from before epsjax.host_memory
        keep_freed_memory = bool
    keep_freed_memory()  # as `import epsjax` did before it stopped doing so: every checkout measured alike
    from epsjax.offload import simulate

    rng = np.random.default_rng(0)
    N, T, L, E, K = 8, 24, 48, 128, 8
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(N * T * L)]).reshape(N, T, L, K)
    probs = rng.random((N, T, L, E)) * 0.5
    np.put_along_axis(probs, ids, 0.9, axis=-1)  # a good forecast with noise
    out = {}
    for policy, forecast in (("lru", "none"), ("predictor", "predictor")):
        start = time.perf_counter()
        stats = simulate.replay_decode(ids, batch_size=4, num_slots=int(0.25 * L * E), policy=policy,
                                       forecast=forecast, probs_NTLE=probs, max_inflight=2)
        steps = (N // 4) * (T - 1)
        out[policy] = {"ms_per_step": 1e3 * (time.perf_counter() - start) / steps, "hit_ratio": stats.hit_ratio}
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":  # the subprocess: one checkout
        sys.path.insert(0, sys.argv[2])
        print(json.dumps(measure()))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkouts", nargs="+", help="epsjax checkouts to measure, the first being the baseline")
    p.add_argument("--out", help="a JSON file to add the results to")
    args = p.parse_args()
    runs = []
    for path in args.checkouts:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        result = subprocess.run([sys.executable, __file__, "--measure", str(Path(path).resolve())], check=True,
                                capture_output=True, text=True)
        runs.append({"checkout": commit, **json.loads(result.stdout.splitlines()[-1])})
        first = runs[0]
        print(f"{commit}: " + ", ".join(
            f"{k} {runs[-1][k]['ms_per_step']:.1f} ms/step (x{first[k]['ms_per_step'] / runs[-1][k]['ms_per_step']:.2f}"
            f" vs {first['checkout']}, hit {runs[-1][k]['hit_ratio']:.4f})" for k in ("lru", "predictor")), flush=True)
    if args.out:
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.exists() else {}
        report["bookkeeping_at_qwen3_scale"] = {
            "what": "scripts/bench_cache_bookkeeping.py: ms of host bookkeeping per decode step, 48 MoE layers x 128 "
                    "experts top-8, batch 4, 25% slots, instant copies; checkouts measured one after the other in "
                    "one run", "runs": runs}
        out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
