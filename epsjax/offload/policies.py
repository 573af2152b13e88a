"""Eviction policies for the device expert cache: LRU, LFU and predictor-aware.

The cache asks a policy to pick a victim among the experts it may evict (never one the running layer needs nor a
slot whose load is in flight). Each policy ranks candidates; the smallest rank is evicted:

    LRU              (last use,)                         least recently used first
    LFU              (uses, last use)                    least frequently used first, LRU among equals
    PredictorAware   (-next predicted use, *base rank)   Belady on the routing-path predictor's forecast: the
                                                         expert whose predicted next use is furthest (or never,
                                                         this step) goes first; the base policy breaks ties

`next_use(key)` is supplied by the cache engine from the current prediction: the number of MoE layers until the
key's layer runs if the predictor says that layer will route to it this step, else infinity.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from epsjax.offload.errors import OffloadError

Key = tuple[int, int]
NextUse = Callable[[Key], float]


class EvictionPolicy:
    """Base: keeps a logical clock, last-use times and use counts; subclasses define `rank`."""

    name = "base"

    def __init__(self):
        self.clock = 0
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}
        self.last_use_LE = self.uses_LE = None  # array mirrors once bound to a cache's [L, E] keys

    def bind(self, num_layers: int, num_experts: int) -> None:
        """Keeps [L, E] arrays of the same clock for (layer, expert) keys: the cache engine ranks all its
        candidates at once (victim_index) instead of one Python call per resident expert."""
        self.last_use_LE = np.zeros((num_layers, num_experts), np.int64)
        self.uses_LE = np.zeros((num_layers, num_experts), np.int64)

    def record_load(self, key: Key) -> None:
        """A fresh load counts as a use for recency (a prefetched expert is not the first victim)."""
        self.clock += 1
        self.last_use[key] = self.clock
        if self.last_use_LE is not None:
            self.last_use_LE[key] = self.clock

    def record_use(self, key: Key) -> None:
        self.clock += 1
        self.last_use[key] = self.clock
        self.uses[key] = self.uses.get(key, 0) + 1
        if self.last_use_LE is not None:
            self.last_use_LE[key] = self.clock
            self.uses_LE[key] += 1

    def rank(self, key: Key, next_use: NextUse) -> tuple:
        raise NotImplementedError

    def rank_arrays(self, layers, experts, next_use) -> list:
        """`rank` of every candidate at once (bound policies): one array per rank component."""
        raise NotImplementedError

    def victim(self, candidates: Iterable[Key], next_use: NextUse | None = None) -> Key:
        next_use = next_use or (lambda key: math.inf)
        return min(candidates, key=lambda k: (self.rank(k, next_use), k))

    def victim_index(self, layers, experts, next_use) -> int:
        """The index of `victim` among candidates (layers[i], experts[i]) with next uses next_use[i]: the smallest
        rank, then the smallest key, as victim() orders them."""
        keys = [*self.rank_arrays(layers, experts, next_use), layers, experts]
        return int(np.lexsort(keys[::-1])[0])


class LRU(EvictionPolicy):
    name = "lru"

    def rank(self, key, next_use):
        return (self.last_use.get(key, 0),)

    def rank_arrays(self, layers, experts, next_use):
        return [self.last_use_LE[layers, experts]]


class LFU(EvictionPolicy):
    """Use counts over the whole run (no ageing); recency breaks ties."""

    name = "lfu"

    def rank(self, key, next_use):
        return (self.uses.get(key, 0), self.last_use.get(key, 0))

    def rank_arrays(self, layers, experts, next_use):
        return [self.uses_LE[layers, experts], self.last_use_LE[layers, experts]]


class PredictorAware(EvictionPolicy):
    """Evicts the expert whose predicted next use is furthest away; `base` (LRU by default) breaks ties."""

    name = "predictor"

    def __init__(self, base: EvictionPolicy | None = None):
        super().__init__()
        self.base = base or LRU()

    def record_load(self, key):
        super().record_load(key)
        self.base.record_load(key)

    def record_use(self, key):
        super().record_use(key)
        self.base.record_use(key)

    def bind(self, num_layers, num_experts):
        super().bind(num_layers, num_experts)
        self.base.bind(num_layers, num_experts)

    def rank(self, key, next_use):
        return (-next_use(key), *self.base.rank(key, next_use))

    def rank_arrays(self, layers, experts, next_use):
        return [-np.asarray(next_use, np.float64), *self.base.rank_arrays(layers, experts, next_use)]


POLICIES = {"lru": LRU, "lfu": LFU, "predictor": PredictorAware}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise OffloadError(f"unknown eviction policy {name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name]()
