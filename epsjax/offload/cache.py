"""The Expert Cache Engine: a budgeted pool of device slots shared by all MoE layers, filled ahead of use from the
routing-path predictor's forecast and corrected as the layers run.

Keys are (layer, expert), `layer` indexing the MoE layers. An expert's life in the cache:

    absent --load started (a slot reserved; its old expert evicted)--> LOADING --installed--> RESIDENT --> evicted

The engine is host-side bookkeeping; a `Transfers` object moves the bytes (transfers.py: to a real device pool, or
instantly for trace simulation). A forward step drives it as:

    begin_step(pred_LE)                 predicted experts of every layer (scores > 0), before the first MoE layer
    for each MoE layer l:
        for slot_E in demand(l, experts_the_router_chose):   waves: run the grouped FFN with slot_of_expert=slot_E
            ...
        end_layer(l)
    end_step()

Placement (PLEC, predictive locality-aware expert caching): at begin_step, and again after each layer, the slots are
split among the layers still to run in proportion to their predicted demand (`plec_quotas`); each layer's quota of
its most probable predicted experts is queued for prefetch, nearest layer first. The quotas of finished layers
return to the pool, so their slots are reused for later layers' predicted experts. A prefetch may only evict an
expert whose predicted next use is later than its own (Belady's rule on the forecast); which one is the eviction
policy's choice (policies.py).

Misprediction handling: when layer l's router has spoken, queued prefetches for l that it did not choose are dropped,
and the experts it chose but the cache lacks go to the high-priority queue, which is served before any prefetch.
At most `max_inflight` transfers are in flight, so a miss waits behind at most that many prefetches. Experts already
resident run first (a wave of their own) while the misses transfer; further waves run once the misses arrive.
Waves also let a layer run when it needs more experts than there are slots.

Budget: the pool holds num_slots experts and at most max_inflight staging buffers exist, so the device bytes the cache
uses are (num_slots + staging) * bytes_per_expert <= budget_bytes, checked at every transfer start.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Iterator, Protocol

import numpy as np

from epsjax.offload.errors import OffloadError
from epsjax.offload.policies import EvictionPolicy

Key = tuple[int, int]
LOADING, RESIDENT = "loading", "resident"
VECTORISE_ABOVE_KEYS = 512  # (layer, expert) keys above which the engine's bookkeeping uses arrays


class Transfers(Protocol):
    """Moves expert weights into pool slots. `start` is asynchronous; `install` makes a started expert usable."""

    def start(self, key: Key, slot: int) -> None: ...
    def ready(self, key: Key) -> bool: ...
    def wait(self, key: Key) -> None: ...
    def install(self, key: Key, slot: int) -> None: ...
    def staging_count(self) -> int: ...
    def wait_staging(self) -> None: ...


class BudgetExceeded(AssertionError):
    pass


@dataclasses.dataclass
class CacheStats:
    accesses: int = 0           # (layer, expert) pairs demanded by a router (with at least one valid token)
    hits: int = 0               # resident when demanded
    late: int = 0               # prefetch planned or in flight when demanded (promoted to high priority)
    misses: int = 0             # not planned: loaded through the high-priority queue
    loads: int = 0              # transfers started
    prefetches: int = 0         # of which prefetches
    wasted_prefetches: int = 0  # prefetched, then evicted before any use
    cancelled: int = 0          # queued prefetches dropped because the router did not choose them
    bytes_h2d: int = 0
    waves: int = 0              # grouped-FFN calls
    layers: int = 0             # MoE layer executions
    wait_seconds: float = 0.0   # host time blocked on transfers a layer needed
    peak_device_bytes: int = 0  # the cache's own accounting: pool + staging buffers

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hit_ratio": self.hit_ratio}


def plec_quotas(demand, capacity: int) -> np.ndarray:
    """Splits `capacity` slots among layers in proportion to their demand (largest remainder, earlier layers first
    among equal remainders), never giving a layer more than it demands.

    >>> plec_quotas([4, 2, 2], 4).tolist()
    [2, 1, 1]
    """
    demand = np.asarray(demand, np.int64)
    total = int(demand.sum())
    if total <= capacity:
        return demand.copy()
    raw = capacity * demand / total
    quotas = np.floor(raw).astype(np.int64)
    order = sorted(range(len(demand)), key=lambda i: (-(raw[i] - quotas[i]), i))
    for i in order[:capacity - int(quotas.sum())]:
        quotas[i] += 1
    return quotas


class PrefetchQueue:
    """The prefetch queue: (layer, expert) keys in order as one [n, 2] array read from the front. It is rebuilt
    after every layer (ExpertCacheEngine._plan) and filtered by every router (demand) with array operations, so
    that per-layer host work does not grow with the number of queued experts."""

    def __init__(self):
        self.clear()

    def set(self, keys_N2) -> None:
        self.keys = np.asarray(keys_N2, np.int64).reshape(-1, 2)
        self.head = 0

    def clear(self) -> None:
        self.set(np.zeros((0, 2), np.int64))

    def pending(self) -> np.ndarray:
        return self.keys[self.head:]

    def __len__(self) -> int:
        return len(self.keys) - self.head

    def __getitem__(self, i: int) -> Key:
        layer, expert = self.keys[self.head + i]
        return int(layer), int(expert)

    def popleft(self) -> Key:
        key = self[0]
        self.head += 1
        return key


class ExpertCacheEngine:
    """Slot bookkeeping, prefetch and miss queues, and statistics for a pool of `num_slots` device slots.

    prefetch: plan loads from the predictions given to begin_step (ExpertFlow); False caches on demand only.
    keep: False frees a layer's slots after it ran (on-demand loading, no cache).
    split_hits: run the resident experts as their own wave while the misses transfer.
    """

    def __init__(self, *, num_layers: int, num_experts: int, num_slots: int, transfers: Transfers,
                 policy: EvictionPolicy, bytes_per_expert: int, budget_bytes: int | None = None,
                 max_inflight: int = 2, prefetch: bool = True, keep: bool = True, split_hits: bool = True):
        if num_slots < 1:
            raise OffloadError(f"the cache needs at least one slot, got {num_slots=}")
        if max_inflight < 1:
            raise OffloadError(f"max_inflight must be >= 1, got {max_inflight=}")
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.transfers, self.policy = transfers, policy
        self.bytes_per_expert, self.budget_bytes = bytes_per_expert, budget_bytes
        self.max_inflight, self.prefetch, self.keep, self.split_hits = max_inflight, prefetch, keep, split_hits
        self.slot_of = np.full((num_layers, num_experts), -1, np.int32)  # installed slot of each expert, or -1
        self.owner: list[Key | None] = [None] * num_slots
        self.status: dict[Key, str] = {}
        self.slot: dict[Key, int] = {}
        self.free = list(range(num_slots))
        self.high: collections.deque[Key] = collections.deque()
        self.low = PrefetchQueue()
        self.inflight: dict[Key, float] = {}   # started, not installed (insertion order = start order)
        self.pinned: set[Key] = set()
        self.unused_prefetch: set[Key] = set()
        self.pred: np.ndarray | None = None    # [L, E] scores of the current step's forecast (0 = not predicted)
        self.layer = 0
        self.current: set[Key] | None = None   # the running layer's demanded experts
        self.stats = CacheStats()
        self._current_E = np.zeros(num_experts, bool)  # the running layer's chosen experts (with self.current)
        policy.bind(num_layers, num_experts)
        # Array bookkeeping pays once there are many keys (Qwen3-30B: 48 x 128); below that, numpy's per-call cost
        # exceeds a short Python loop (measured: scripts/profile_offload.py), so small caches keep the loops.
        self.vectorised = num_layers * num_experts > VECTORISE_ABOVE_KEYS
        self._check_budget()

    # Queries --------------------------------------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Device bytes held by the cache: the pool plus live staging buffers."""
        return (self.num_slots + self.transfers.staging_count()) * self.bytes_per_expert

    def resident(self, key: Key) -> bool:
        return self.status.get(key) == RESIDENT

    def next_use(self, key: Key) -> float:
        """MoE layers until the forecast says `key` is used this step (0: the running layer), else infinity."""
        layer, expert = key
        if self.current is not None and key in self.current:
            return 0.0
        if self.pred is None or layer < self.layer or self.pred[layer, expert] <= 0:
            return math.inf
        if layer == self.layer and self.current is not None:
            return math.inf  # the router has spoken for this layer and did not choose it
        return float(layer - self.layer)

    # Step protocol --------------------------------------------------------------------------------------------

    def begin_step(self, pred_LE: np.ndarray | None = None) -> None:
        """Starts a forward step with the forecast for every MoE layer (scores [L, E], > 0 = predicted)."""
        self.layer, self.current = 0, None
        self.pred = None if pred_LE is None else np.asarray(pred_LE, np.float64)
        if self.pred is not None and self.pred.shape != (self.num_layers, self.num_experts):
            raise OffloadError(f"predictions must be [L, E] = {(self.num_layers, self.num_experts)}, "
                               f"got {self.pred.shape}")
        if self.pred is not None:  # once per step: every layer's experts by forecast score, and its demand
            self._order_LE = np.argsort(-self.pred, axis=1, kind="stable")
            self._demand_L = (self.pred > 0).sum(-1)
        self._plan(0)
        self.pump()

    def demand(self, layer: int, experts) -> Iterator[np.ndarray]:
        """The router of MoE layer `layer` chose `experts`; yields slot tables [E] (int32, -1 = skip) for waves
        of the grouped FFN until every chosen expert has run once."""
        self.layer = layer
        self.install_ready()
        needed = [(layer, int(e)) for e in sorted(set(int(e) for e in experts))]
        self.current = set(needed)
        self.stats.layers += 1
        pending = self.low.pending()  # prefetches this router (or an earlier one) did not choose are mispredictions
        chosen_E = self._current_E = np.zeros(self.num_experts, bool)
        chosen_E[[e for _, e in needed]] = True
        in_current = (pending[:, 0] == layer) & chosen_E[pending[:, 1]]
        dropped = (pending[:, 0] <= layer) & ~in_current
        self.stats.cancelled += int(dropped.sum())
        promoted = {(layer, int(e)) for e in pending[in_current, 1]}
        self.low.set(pending[~dropped & ~in_current])
        for key in needed:
            self.stats.accesses += 1
            if self.status.get(key) == RESIDENT:
                self.stats.hits += 1
            elif self.status.get(key) == LOADING or key in promoted:
                self.stats.late += 1
            else:
                self.stats.misses += 1
            if key not in self.status and key not in self.high:
                self.high.append(key)

        remaining, first = needed, True
        while remaining:
            self.pinned = set(remaining)
            self.pump()
            wave = [k for k in remaining if self.status.get(k) == RESIDENT]
            if not (first and wave and self.split_hits):
                self._wait_for(remaining)
                wave = [k for k in remaining if self.status.get(k) == RESIDENT]
            first = False
            if not wave:
                raise RuntimeError(f"MoE layer {layer}: no chosen expert could be loaded ({self.num_slots} slots)")
            table = np.full((self.num_experts,), -1, np.int32)
            for key in wave:
                table[key[1]] = self.slot[key]
                self.policy.record_use(key)
                self.unused_prefetch.discard(key)
            self.stats.waves += 1
            yield table
            done = set(wave)
            remaining = [k for k in remaining if k not in done]
        self.pinned = set()
        if not self.keep:
            for key in needed:
                self._evict(key)

    def end_layer(self, layer: int) -> None:
        self.layer, self.current = layer + 1, None
        self._plan(layer + 1)
        self.pump()

    def end_step(self) -> None:
        self.layer, self.current = self.num_layers, None
        self.low.clear()

    def reset_stats(self) -> None:
        self.stats = CacheStats()
        self._check_budget()  # the peak starts at what the cache holds now

    def mark_resident(self, key: Key, slot: int) -> None:
        """Records an expert placed in `slot` outside the transfer path (e.g. the all-on-device pool)."""
        self.free.remove(slot)
        self.slot[key], self.owner[slot], self.status[key] = slot, key, RESIDENT
        self.slot_of[key] = slot
        self.policy.record_load(key)

    # Transfers --------------------------------------------------------------------------------------------------

    def pump(self) -> int:
        """Installs finished transfers and starts queued ones (misses first) while the in-flight window has room.
        Returns how many transfers it started."""
        self.install_ready()
        started = 0
        while self.transfers.staging_count() < self.max_inflight:
            queue, is_prefetch = (self.high, False) if self.high else (self.low, True)
            if not queue:
                break
            key = queue[0]
            if key in self.status:
                queue.popleft()
                continue
            slot = self._reserve(limit=self.next_use(key) if is_prefetch else -math.inf)
            if slot is None:
                break  # a miss waits for a slot and no prefetch overtakes it; later prefetches would not fit either
            queue.popleft()
            self._start(key, slot, is_prefetch)
            started += 1
        self.install_ready()
        return started

    def install_ready(self) -> int:
        done = [k for k in self.inflight if self.transfers.ready(k)]
        for key in done:
            self._install(key)
        return len(done)

    def wait_until(self, is_ready) -> None:
        """Keeps the transfer queues moving until is_ready() (e.g. the router's output is computed)."""
        while not is_ready():
            if not self.pump() and not self.inflight:
                return
            if self.inflight and not is_ready():
                time.sleep(20e-6)

    # Internals --------------------------------------------------------------------------------------------------

    def _plan(self, start: int) -> None:
        """Rebuilds the prefetch queue for layers start.. from the forecast (PLEC quotas, nearest layer first)."""
        self.low.clear()
        if not self.prefetch or self.pred is None or start >= self.num_layers:
            return
        # Vectorised (this runs after every layer): each remaining layer's `quota` best experts, layer-major, in
        # score order, less those resident, loading or queued as misses.
        quotas = plec_quotas(self._demand_L[start:], self.num_slots)
        if not self.vectorised:
            keys = [(start + offset, int(e)) for offset, quota in enumerate(quotas)
                    for e in self._order_LE[start + offset, :quota]]
            high = set(self.high)
            self.low.set([k for k in keys if k not in self.status and k not in high])
            return
        take = np.arange(self.num_experts)[None, :] < quotas[:, None]  # [L', E] rank < quota
        layers = np.nonzero(take)[0] + start
        experts = self._order_LE[start:][take]
        present = self.slot_of[layers, experts] >= 0
        if self.inflight or self.high:  # few keys: mark them in a [L, E] mask
            busy_LE = np.zeros(self.slot_of.shape, bool)
            busy = np.array([*self.inflight, *self.high], np.int64).reshape(-1, 2)
            busy_LE[busy[:, 0], busy[:, 1]] = True
            present |= busy_LE[layers, experts]
        self.low.set(np.stack([layers[~present], experts[~present]], axis=1))

    def _reserve(self, *, limit: float) -> int | None:
        """A free slot, or the slot of an evicted expert whose next use is later than `limit`."""
        if self.free:
            return self.free.pop(0)
        if not self.vectorised:
            candidates = [k for k, s in self.status.items()
                          if s == RESIDENT and k not in self.pinned and self.next_use(k) > limit]
            if not candidates:
                return None
            victim = self.policy.victim(candidates, self.next_use)
            slot = self.slot[victim]
            self._evict(victim, free=False)
            return slot
        # Array work over the resident experts (this runs per load): candidates, their next uses, the policy's rank.
        layers, experts = np.nonzero(self.slot_of >= 0)
        next_use = self._next_use_array(layers, experts)
        ok = next_use > limit
        if self.pinned:
            pinned_LE = np.zeros(self.slot_of.shape, bool)
            pinned = np.array(list(self.pinned), np.int64).reshape(-1, 2)
            pinned_LE[pinned[:, 0], pinned[:, 1]] = True
            ok &= ~pinned_LE[layers, experts]
        if not ok.any():
            return None
        i = self.policy.victim_index(layers[ok], experts[ok], next_use[ok])
        victim = (int(layers[ok][i]), int(experts[ok][i]))
        slot = self.slot[victim]
        self._evict(victim, free=False)
        return slot

    def _next_use_array(self, layers, experts) -> np.ndarray:
        """next_use of many keys at once (the same rule)."""
        next_use = np.full(len(layers), math.inf)
        if self.pred is not None:
            ok = (layers >= self.layer) & (self.pred[layers, experts] > 0)
            if self.current is not None:
                ok &= layers != self.layer
            next_use = np.where(ok, (layers - self.layer).astype(np.float64), math.inf)
        if self.current is not None:
            next_use[(layers == self.layer) & self._current_E[experts]] = 0.0
        return next_use

    def _evict(self, key: Key, free: bool = True) -> None:
        if key not in self.slot:
            return
        slot = self.slot.pop(key)
        del self.status[key]
        self.slot_of[key] = -1
        self.owner[slot] = None
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.stats.wasted_prefetches += 1
        if free:
            self.free.append(slot)
            self.free.sort()

    def _start(self, key: Key, slot: int, is_prefetch: bool) -> None:
        self.slot[key], self.owner[slot], self.status[key] = slot, key, LOADING
        self.inflight[key] = time.perf_counter()
        self.transfers.start(key, slot)
        self.stats.loads += 1
        self.stats.bytes_h2d += self.bytes_per_expert
        if is_prefetch:
            self.stats.prefetches += 1
            self.unused_prefetch.add(key)
        self._check_budget()

    def _install(self, key: Key) -> None:
        slot = self.slot[key]
        self.transfers.install(key, slot)
        del self.inflight[key]
        self.status[key] = RESIDENT
        self.slot_of[key] = slot
        self.policy.record_load(key)

    def _wait_for(self, remaining: list[Key]) -> None:
        """Blocks until no chosen expert is in flight and no queued miss can start."""
        start = time.perf_counter()
        while True:
            loading = [k for k in remaining if self.status.get(k) == LOADING]
            blocked = [k for k in remaining if k in self.high]
            if loading:
                self.transfers.wait(loading[0])
            elif blocked and self.inflight:
                self.transfers.wait(next(iter(self.inflight)))
            elif blocked and self.transfers.staging_count() >= self.max_inflight:
                self.transfers.wait_staging()  # installs still hold staging buffers
            elif blocked and self.pump():
                continue  # the window freed since the last pump
            else:
                break  # the blocked misses need slots this layer pins: a later wave takes them
            self.pump()
        self.stats.wait_seconds += time.perf_counter() - start

    def _check_budget(self) -> None:
        used = self.device_bytes()
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, used)
        if self.budget_bytes is not None and used > self.budget_bytes:
            raise BudgetExceeded(f"expert cache uses {used} device bytes, over its budget of {self.budget_bytes}")
