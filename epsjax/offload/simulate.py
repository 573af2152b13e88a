"""Replaying decode routing traces through the cache engine (no bytes move) to compare placement policies.

Each batch of `batch_size` consecutive sequences decodes steps prompt_len..T-1; at every step every MoE layer demands
the experts its tokens were routed to. The forecast given to the engine before the step is one of: none (LRU, LFU),
the predictor's (union of each token's top-k), or the temporal baseline's (the experts of the previous step).
"""

from __future__ import annotations

import numpy as np

from epsjax.offload.cache import CacheStats, ExpertCacheEngine
from epsjax.offload.policies import make_policy
from epsjax.offload.predictor import union_topk_scores
from epsjax.offload.transfers import InstantTransfers


def replay_decode(ids_NTLK, *, batch_size: int, num_slots: int, policy: str = "lru", forecast: str = "none",
                  probs_NTLE=None, prompt_len: int = 1, max_inflight: int = 1) -> CacheStats:
    """forecast: "none", "predictor" (needs probs_NTLE) or "temporal"."""
    ids = np.asarray(ids_NTLK)
    N, T, L, K = ids.shape
    E = int(ids.max()) + 1 if probs_NTLE is None else np.shape(probs_NTLE)[-1]
    engine = ExpertCacheEngine(num_layers=L, num_experts=E, num_slots=num_slots, transfers=InstantTransfers(),
                               policy=make_policy(policy), bytes_per_expert=1, max_inflight=max_inflight,
                               prefetch=forecast != "none")
    for start in range(0, N - batch_size + 1, batch_size):
        batch = ids[start:start + batch_size]
        for t in range(prompt_len, T):
            step = batch[:, t]  # [B, L, K]
            valid = step[:, 0, 0] >= 0
            if forecast == "predictor":
                pred = union_topk_scores(np.asarray(probs_NTLE[start:start + batch_size, t])[valid], K)
            elif forecast == "temporal":
                prev = batch[:, t - 1][valid]
                pred = np.zeros((L, E))
                for layer in range(L):
                    pred[layer, np.unique(prev[:, layer][prev[:, layer] >= 0])] = 1.0
            else:
                pred = None
            engine.begin_step(pred)
            for layer in range(L):
                for _ in engine.demand(layer, np.unique(step[valid, layer])):
                    pass
                engine.end_layer(layer)
            engine.end_step()
    return engine.stats
