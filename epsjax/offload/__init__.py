"""ExpertFlow-style expert offloading: a host expert store, a budgeted device expert cache filled from a routing-path
predictor's forecast, a token scheduler that regroups sequences by routing path, and the runtime that drives the
model layer by layer.

    store.py       ExpertStore: routed experts in host memory (pinned_host where the device has it)
    cache.py       ExpertCacheEngine: slots, PLEC placement, prefetch and priority miss queues, waves, budget
    policies.py    eviction: LRU, LFU, predictor-aware
    transfers.py   device pool and asynchronous host -> device copies (or instant ones, for trace replay)
    runtime.py     OffloadEngine (modes device | on_demand | lru | expertflow), an Engine with the same contract
    state.py       OffloadState: an offloaded batch's decode state and recent tokens (runtime and scheduler share it)
    predictor.py   RoutingPredictor: Flax encoder + per-layer heads, [B, S, L, E] in one pass; optax training
    traces.py      routing traces (collection, synthetic corpus), metrics.py recall, simulate.py trace replay
    scheduler.py   token scheduler: balanced 2-means re-split of two batches, KV-consistent regrouping
"""

from epsjax.offload.cache import BudgetExceeded, CacheStats, ExpertCacheEngine, plec_quotas
from epsjax.offload.policies import LFU, LRU, PredictorAware, make_policy
from epsjax.offload.predictor import PredictorConfig, RoutingPredictor, train_predictor, union_topk_scores
from epsjax.offload.runtime import OffloadConfig, OffloadEngine
from epsjax.offload.state import OffloadState
from epsjax.offload.store import ExpertStore, host_memory_kind

__all__ = [
    "BudgetExceeded", "CacheStats", "ExpertCacheEngine", "ExpertStore", "LFU", "LRU", "OffloadConfig",
    "OffloadEngine", "OffloadState", "PredictorAware", "PredictorConfig", "RoutingPredictor", "host_memory_kind",
    "make_policy", "plec_quotas", "train_predictor", "union_topk_scores",
]
