"""The token scheduler: re-splitting two batches by routing path (worked example, random pools, time), and decode
state that moves with regrouped sequences (same tokens as without regrouping)."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax.engine import RequestError, SamplingParams
from epsjax.offload import scheduler
from epsjax.offload.predictor import routing_targets
from epsjax.offload.runtime import OffloadConfig, OffloadEngine


def test_split_two_worked_example():
    # One layer, four experts; paths arrive interleaved: A = {0, 1}, B = {2, 3}, A, B. In arrival order, batches
    # {0, 1} and {2, 3} each activate all 4 experts (cost 8); grouping like with like activates 2 each (cost 4).
    A, B = [1, 1, 0, 0], [0, 0, 1, 1]
    paths = np.array([A, B, A, B], bool)
    assert scheduler.union_cost(paths, [[0, 1], [2, 3]]) == 8
    a, b = scheduler.split_two(paths)
    assert sorted([a.tolist(), b.tolist()]) == [[0, 2], [1, 3]]
    assert scheduler.union_cost(paths, [a, b]) == 4


def clustered_paths(rng, n, clusters=4, L=3, E=16, k=2, noise=0.2):
    """Paths of n sequences drawn around `clusters` routing patterns (top-k experts per layer each)."""
    centers = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(clusters)])
    ids = centers[rng.integers(clusters, size=n)]  # [n, L, k]
    flip = rng.random(ids.shape) < noise
    ids = np.where(flip, rng.integers(E, size=ids.shape), ids)
    return routing_targets(ids[:, None], E)[:, 0].reshape(n, -1).astype(bool)


def test_form_batches_reduces_active_experts_against_arrival_order():
    rng = np.random.default_rng(0)
    paths = clustered_paths(rng, 128)
    arrival = [np.arange(s, s + 16) for s in range(0, 128, 16)]
    scheduled = scheduler.form_batches(paths, 16)
    assert sorted(np.concatenate(scheduled).tolist()) == list(range(128))  # a permutation
    assert all(len(b) == 16 for b in scheduled)
    before, after = scheduler.union_cost(paths, arrival), scheduler.union_cost(paths, scheduled)
    assert after < 0.85 * before, (before, after)


def test_split_two_on_two_batches_of_32_with_512_bit_paths():
    # The size ExpertFlow's scheduler works at per step (its time is a benchmark's job: bench_offload.py reports
    # split_two's milliseconds; a timed assertion here would only measure how busy the CI machine is).
    rng = np.random.default_rng(1)
    paths = clustered_paths(rng, 64, E=64, L=8)
    a, b = scheduler.split_two(paths)
    assert len(a) == len(b) == 32
    arrival = [np.arange(32), np.arange(32, 64)]
    assert scheduler.union_cost(paths, [a, b]) < scheduler.union_cost(paths, arrival)

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 24), st.integers(0, 2**31 - 1))
def test_split_two_is_balanced_and_never_worse_than_its_kmeans_start(n, seed):
    rng = np.random.default_rng(seed)
    paths = rng.random((n, 12)) < 0.3
    a, b = scheduler.split_two(paths)
    assert len(a) == n // 2 and len(b) == n - n // 2
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(n))
    a0, b0 = scheduler.split_two(paths, max_swaps=0)
    assert scheduler.union_cost(paths, [a, b]) <= scheduler.union_cost(paths, [a0, b0])


def test_regrouped_decoding_keeps_every_sequence_consistent(tiny_model, trained):
    # Batch a's prompts pad to 8 tokens and batch b's to 16: the write indices differ, so regrouping also shifts
    # a's KV cache. Each sequence must still generate exactly what it generates when never moved.
    predictor, tokens, _ = trained
    rng = np.random.default_rng(2)
    prompts_a = [tokens[i, :rng.integers(2, 8)].tolist() for i in range(3)]
    prompts_b = [tokens[i, :rng.integers(9, 16)].tolist() for i in range(3, 6)]
    engine = OffloadEngine(tiny_model, OffloadConfig(mode="expertflow", budget_fraction=0.5), predictor=predictor)
    ids = [np.asarray(p) for p in prompts_a + prompts_b]
    fixed, fixed_log = scheduler.generate_two_batches(engine, ids, max_new_tokens=8, regroup=False, split=3)
    moved, moved_log = scheduler.generate_two_batches(engine, ids, max_new_tokens=8, regroup=True, split=3)
    assert moved.tokens == fixed.tokens
    reference = OffloadEngine(tiny_model, OffloadConfig(mode="device")).generate(prompts_a + prompts_b,
                                                                                  max_new_tokens=8)
    assert reference.tokens == fixed.tokens
    assert len(moved_log["split_seconds"]) == 7 and len(moved_log["distinct_experts"]) == 14
    assert (moved.tokens_per_expert == reference.tokens_per_expert).all()  # same routing, whatever the batches


def test_token_scheduled_generate_matches_unscheduled(tiny_model, trained):
    predictor, tokens, _ = trained
    prompts = [tokens[i, :n].tolist() for i, n in enumerate((3, 9, 5, 12, 7))]  # odd: batches of 2 and 3
    engine = OffloadEngine(tiny_model, OffloadConfig(mode="expertflow", budget_fraction=0.25), predictor=predictor)
    plain = engine.generate(prompts, max_new_tokens=6)
    scheduled = engine.generate(prompts, max_new_tokens=6, schedule_tokens=True)
    assert scheduled.tokens == plain.tokens
    assert len(engine.schedule_log["split_seconds"]) == 5
    # sampling: each sequence draws from its own stream, so regrouping changes no token either
    sampling = SamplingParams(temperature=1.0, seed=3)
    a, _ = scheduler.generate_two_batches(engine, [np.asarray(p) for p in prompts], max_new_tokens=6,
                                          sampling=sampling, regroup=False)
    b = engine.generate(prompts, max_new_tokens=6, sampling=sampling, schedule_tokens=True)
    assert a.tokens == b.tokens
    with pytest.raises(RequestError, match="at least 2 prompts"):
        engine.generate(prompts[:1], schedule_tokens=True)
    lru = OffloadEngine(tiny_model, OffloadConfig(mode="lru", budget_fraction=0.25))
    with pytest.raises(RequestError, match="routing predictor"):
        lru.generate(prompts, schedule_tokens=True)

