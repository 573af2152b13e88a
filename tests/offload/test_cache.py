"""The cache engine's host logic: PLEC quotas, eviction policies, prefetch / miss priority, waves and the budget,
as worked examples and a long random workload."""

import math

import numpy as np
import pytest

from epsjax.offload.cache import BudgetExceeded, ExpertCacheEngine, plec_quotas
from epsjax.offload import cache as cache_module
from epsjax.offload.policies import LFU, LRU, PredictorAware, make_policy
from epsjax.offload.transfers import InstantTransfers


class ManualTransfers:
    """A transfer completes only when waited for; records the order transfers start in."""

    def __init__(self):
        self.started, self.done, self.live = [], set(), set()

    def start(self, key, slot):
        self.started.append(key)
        self.live.add(key)

    def ready(self, key):
        return key in self.done

    def wait(self, key):
        self.done.add(key)

    def install(self, key, slot):
        self.live.discard(key)

    def staging_count(self):
        return len(self.live)

    def wait_staging(self):
        pass


class RandomTransfers:
    """Transfers finish at random; a staging buffer outlives its install for a random while."""

    def __init__(self, rng):
        self.rng, self.inflight, self.installing = rng, set(), []

    def start(self, key, slot):
        self.inflight.add(key)

    def ready(self, key):
        return self.rng.random() < 0.3

    def wait(self, key):
        pass  # ready() will say so eventually; the engine polls again after pump()

    def install(self, key, slot):
        self.inflight.discard(key)
        self.installing.append(key)

    def staging_count(self):
        self.installing = [k for k in self.installing if self.rng.random() < 0.5]
        return len(self.inflight) + len(self.installing)

    def wait_staging(self):
        self.installing = self.installing[1:]


@pytest.fixture(autouse=True, params=["loops", "arrays"])
def bookkeeping(request, monkeypatch):
    """Every test here runs with both bookkeeping paths of the engine (Python loops for few keys, arrays above)."""
    monkeypatch.setattr(cache_module, "VECTORISE_ABOVE_KEYS", 0 if request.param == "arrays" else 10**9)
    return request.param


def make_engine(transfers, *, L=2, E=4, S=3, policy="predictor", **kw):
    return ExpertCacheEngine(num_layers=L, num_experts=E, num_slots=S, transfers=transfers,
                             policy=make_policy(policy), bytes_per_expert=1, **kw)


def run_layer(engine, layer, experts):
    waves = [table.copy() for table in engine.demand(layer, experts)]
    engine.end_layer(layer)
    return waves


def test_plec_quotas_worked_examples():
    assert plec_quotas([4, 2, 2], 4).tolist() == [2, 1, 1]   # exact proportions
    assert plec_quotas([3, 3, 3], 4).tolist() == [2, 1, 1]   # remainders tie: the earlier layer gets the spare slot
    assert plec_quotas([1, 6, 1], 4).tolist() == [1, 3, 0]   # 0.5, 3, 0.5: floors 0, 3, 0; the spare slot to layer 0
    assert plec_quotas([2, 1], 8).tolist() == [2, 1]         # enough room: everyone gets its demand
    assert plec_quotas([0, 5], 2).tolist() == [0, 2]


def test_policies_worked_example():
    # a used at t=1, b at t=2 and t=3, c loaded at t=4 and never used.
    assert _replay(LRU()).victim(["a", "b", "c"]) == "a"  # least recently used
    assert _replay(LFU()).victim(["a", "b", "c"]) == "c"  # fewest uses (0)
    next_use = {"a": 0.0, "b": math.inf, "c": 2.0}.get
    assert _replay(PredictorAware()).victim(["a", "b", "c"], next_use) == "b"  # not needed again this step
    assert _replay(PredictorAware()).victim(["a", "c"], next_use) == "c"  # needed later than a


def _replay(policy):
    policy.record_use("a")
    policy.record_use("b")
    policy.record_use("b")
    policy.record_load("c")
    return policy


def test_prefetch_misprediction_and_reuse_worked_example():
    # 2 MoE layers x 4 experts, 3 slots. Forecast: layer 0 -> {0, 1}, layer 1 -> {2, 3}.
    # PLEC: demand [2, 2] over 3 slots -> quotas [2, 1]; layer 1's quota takes its more probable expert, 2.
    engine = make_engine(InstantTransfers())
    pred = np.zeros((2, 4))
    pred[0, [0, 1]] = [0.9, 0.8]
    pred[1, [2, 3]] = [0.7, 0.6]
    engine.begin_step(pred)
    assert sorted(engine.status) == [(0, 0), (0, 1), (1, 2)]
    # Layer 0's router chooses {0, 3}: 0 hits; 3 misses and evicts the mispredicted (0, 1) (not needed again this
    # step) rather than (1, 2) (needed next layer). Transfers are instant here, so both run in one wave.
    waves = run_layer(engine, 0, [0, 3])
    assert [np.flatnonzero(w >= 0).tolist() for w in waves] == [[0, 3]]
    assert (0, 1) not in engine.status and engine.stats.wasted_prefetches == 1
    # After layer 0, its slots serve layer 1: the quota is now 2, so (1, 3) is prefetched over (0, 0), the least
    # recently used of layer 0's finished experts.
    assert (1, 3) in engine.status and (0, 0) not in engine.status and (0, 3) in engine.status
    run_layer(engine, 1, [3])
    engine.end_step()
    s = engine.stats
    assert (s.accesses, s.hits, s.misses, s.late) == (3, 2, 1, 0)
    assert (s.loads, s.prefetches) == (5, 4)


def test_misses_overtake_queued_prefetches():
    # One transfer in flight at a time. Forecast: layer 0 -> {0, 1}, layer 1 -> {1, 2}: (0, 0) starts, the rest queue.
    transfers = ManualTransfers()
    engine = make_engine(transfers, S=4, max_inflight=1)
    pred = np.zeros((2, 4))
    pred[0, [0, 1]] = [0.9, 0.8]
    pred[1, [1, 2]] = [0.9, 0.8]
    engine.begin_step(pred)
    assert transfers.started == [(0, 0)]
    # The router of layer 0 chooses {3}: the queued (0, 1) is cancelled, the in-flight (0, 0) cannot be; the miss
    # (0, 3) starts as soon as the window frees, before the prefetches queued for layer 1.
    run_layer(engine, 0, [3])
    assert transfers.started == [(0, 0), (0, 3), (1, 1)]
    assert engine.stats.cancelled == 1 and engine.stats.misses == 1
    # Layer 1 chooses {1, 2}: (1, 1) is in flight, (1, 2) still queued; both were foreseen ("late", not misses).
    run_layer(engine, 1, [1, 2])
    assert engine.stats.late == 2 and engine.stats.misses == 1


@pytest.mark.parametrize("split_hits", [True, False])
def test_hits_run_while_misses_transfer(split_hits):
    transfers = ManualTransfers()
    engine = make_engine(transfers, L=1, S=4, policy="lru", prefetch=False, split_hits=split_hits)
    engine.begin_step(None)
    run_layer(engine, 0, [0])
    engine.begin_step(None)
    # Expert 0 is resident, 1 is not: with split_hits the grouped FFN runs expert 0 before 1's transfer is waited on.
    waves = []
    for table in engine.demand(0, [0, 1]):
        waves.append(np.flatnonzero(table >= 0).tolist())
        if len(waves) == 1 and split_hits:
            assert transfers.started[-1] == (0, 1) and (0, 1) not in transfers.done
    assert waves == ([[0], [1]] if split_hits else [[0, 1]])


def test_waves_when_a_layer_needs_more_experts_than_slots():
    engine = make_engine(InstantTransfers(), L=1, E=8, S=3, policy="lru", prefetch=False)
    engine.begin_step(None)
    waves = run_layer(engine, 0, range(8))
    covered = [e for w in waves for e in np.flatnonzero(w >= 0)]
    assert sorted(covered) == list(range(8)) and len(covered) == 8  # every expert exactly once
    assert all((w >= 0).sum() <= 3 for w in waves) and len(waves) == 3


def test_on_demand_frees_after_each_layer():
    engine = make_engine(InstantTransfers(), S=4, policy="lru", prefetch=False, keep=False)
    for _ in range(3):
        engine.begin_step(None)
        run_layer(engine, 0, [0, 1])
        assert not engine.status
        engine.end_step()
    assert engine.stats.hits == 0 and engine.stats.loads == 6


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictor"])
def test_budget_and_invariants_over_a_long_random_workload(policy):
    rng = np.random.default_rng({"lru": 0, "lfu": 1, "predictor": 2}[policy])
    L, E, S, inflight = 4, 16, 7, 3
    budget = (S + inflight) * 100
    engine = ExpertCacheEngine(num_layers=L, num_experts=E, num_slots=S, transfers=RandomTransfers(rng),
                               policy=make_policy(policy), bytes_per_expert=100, budget_bytes=budget,
                               max_inflight=inflight, prefetch=policy == "predictor")
    for step in range(400):
        pred = np.where(rng.random((L, E)) < 0.25, rng.random((L, E)), 0.0)
        engine.begin_step(pred if policy == "predictor" else None)
        for layer in range(L):
            chosen = rng.choice(E, size=rng.integers(1, 11), replace=False)  # sometimes more than S
            seen = []
            for table in engine.demand(layer, chosen):
                live = np.flatnonzero(table >= 0)
                assert all(engine.resident((layer, int(e))) for e in live)
                assert len(set(table[live])) == len(live)  # distinct slots
                seen.extend(live.tolist())
                assert engine.device_bytes() <= budget
            assert sorted(seen) == sorted(chosen.tolist())
            engine.end_layer(layer)
            assert len(engine.status) <= S
            assert sorted(engine.slot.values()) == sorted(s for s, k in enumerate(engine.owner) if k is not None)
            for (l, e), s in engine.slot.items():
                assert engine.owner[s] == (l, e)
                assert engine.slot_of[l, e] == (s if engine.resident((l, e)) else -1)
        engine.end_step()
    assert engine.stats.peak_device_bytes <= budget
    assert engine.stats.hits + engine.stats.late + engine.stats.misses == engine.stats.accesses


def test_budget_violation_is_detected():
    # A budget smaller than the pool itself is refused at construction.
    with pytest.raises(BudgetExceeded):
        ExpertCacheEngine(num_layers=1, num_experts=4, num_slots=4, transfers=InstantTransfers(), policy=LRU(),
                          bytes_per_expert=10, budget_bytes=30)


@pytest.mark.parametrize("name", ["lru", "lfu", "predictor"])
def test_vectorised_victim_equals_the_rank_order(name):
    # The cache engine ranks candidates with arrays (victim_index); it must pick what victim() picks.
    rng = np.random.default_rng(0)
    policy = make_policy(name)
    policy.bind(3, 5)
    for _ in range(200):
        key = (int(rng.integers(3)), int(rng.integers(5)))
        (policy.record_use if rng.random() < 0.7 else policy.record_load)(key)
        layers, experts = np.nonzero(rng.random((3, 5)) < 0.6)
        if not len(layers):
            continue
        next_use = rng.choice([0.0, 1.0, 2.0, np.inf], size=len(layers))
        lookup = {(int(a), int(b)): u for a, b, u in zip(layers, experts, next_use)}
        i = policy.victim_index(layers, experts, next_use)
        assert (int(layers[i]), int(experts[i])) == policy.victim(list(lookup), lookup.get)
