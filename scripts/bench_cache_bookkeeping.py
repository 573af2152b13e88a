"""Host bookkeeping of the offload cache engine at Qwen3-30B-A3B scale (48 MoE layers x 128 experts, top-8, batch 4,
25% of the experts in slots): milliseconds per decode step of a hit-ratio replay (instant copies, so the replay is
all bookkeeping), for LRU and for the predictor's prefetch. Routing is random with a noisy forecast: the cost depends
on the sizes, not on the routing's structure.

    python scripts/bench_cache_bookkeeping.py .             # this checkout
    python scripts/bench_cache_bookkeeping.py /path/to/old  # another checkout of epsjax, e.g. a git worktree of an
                                                            # older commit (before / after a change)
"""
import json
import sys
import time

import numpy as np

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
from epsjax.offload import simulate  # noqa: E402

rng = np.random.default_rng(0)
N, T, L, E, K = 8, 24, 48, 128, 8
ids = np.stack([rng.choice(E, K, replace=False) for _ in range(N * T * L)]).reshape(N, T, L, K)
probs = rng.random((N, T, L, E)) * 0.5
np.put_along_axis(probs, ids, 0.9, axis=-1)  # a good forecast with noise
out = {}
for policy, forecast in (("lru", "none"), ("predictor", "predictor")):
    start = time.perf_counter()
    stats = simulate.replay_decode(ids, batch_size=4, num_slots=int(0.25 * L * E), policy=policy, forecast=forecast,
                                   probs_NTLE=probs, max_inflight=2)
    steps = (N // 4) * (T - 1)
    out[policy] = {"ms_per_step": 1e3 * (time.perf_counter() - start) / steps, "hit_ratio": stats.hit_ratio}
print(json.dumps(out))
