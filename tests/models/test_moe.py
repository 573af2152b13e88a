"""Routers and the local expert compute, as small worked examples plus random checks against a per-expert loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epsjax.generation import SamplingParams, SlotRows, sample
from epsjax.models import LocalExperts, RouterConfig
from epsjax.models.router import route


def test_group_limited_routing_worked_example():
    # 8 experts in 4 groups of 2; a token may only use its 2 best groups (group score = its best expert's prob).
    # probs ~ softmax(logits): the best single experts are 0 (group 0) and 7 (group 3), so groups 0 and 3 win,
    # and expert 4 (group 2, second-best logit overall... but in a losing group) must not be picked.
    logits = jnp.log(jnp.array([[0.30, 0.01, 0.02, 0.02, 0.25, 0.05, 0.05, 0.30]]))
    ids, weights = route(logits, RouterConfig(top_k=2, topk_norm_p=None, n_group=4, topk_group=2,
                                              routed_scaling_factor=2.0))
    assert sorted(ids[0].tolist()) == [0, 7]
    np.testing.assert_allclose(np.sort(weights[0]), [0.6, 0.6], rtol=1e-5)  # 0.30 * scaling 2.0, no renorm


def test_renormalised_topk_worked_example():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    ids, weights = route(logits, RouterConfig(top_k=2, topk_norm_p=1.0))
    assert ids[0].tolist() == [0, 1]
    np.testing.assert_allclose(weights[0], [0.625, 0.375], rtol=1e-5)


def _loop_reference(x, ids, weights, wg, wu, wd, valid):
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        for e, g in zip(ids[t], weights[t]):
            h = x[t] @ wg[e]
            y[t] += g * ((h / (1 + np.exp(-h))) * (x[t] @ wu[e])) @ wd[e]
    return y


@pytest.mark.parametrize("skewed", [False, True])
def test_local_experts_match_per_expert_loop(skewed):
    T, K, E, D, F = 24, 2, 6, 16, 8
    keys = jax.random.split(jax.random.key(0), 6)
    x = np.asarray(jax.random.normal(keys[0], (T, D)))
    ids = np.array(jax.random.randint(keys[1], (T, K), 0, E))
    if skewed:
        ids[:, 0] = 3  # every token's first choice is expert 3
    weights = np.asarray(jax.random.uniform(keys[2], (T, K)))
    wg, wu = (np.asarray(jax.random.normal(k, (E, D, F))) / 4 for k in keys[3:5])
    wd = np.asarray(jax.random.normal(keys[5], (E, F, D))) / 4
    valid = np.arange(T) % 5 != 0  # some padding tokens
    y, stats = LocalExperts()(x, ids, weights, wg, wu, wd, valid)
    np.testing.assert_allclose(np.asarray(y), _loop_reference(x, ids, weights, wg, wu, wd, valid), atol=1e-4)
    expected_counts = np.bincount(ids[valid].reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), expected_counts)
    assert int(stats.dropped) == 0


def test_capacity_drops_are_reported_and_follow_token_order():
    # 4 tokens all routed (k=1) to expert 0 of 2; capacity = ceil(0.5 * 4 * 1 / 2) = 1: tokens 1..3 are dropped.
    T, E, D, F = 4, 2, 4, 4
    x = np.ones((T, D), np.float32)
    ids = np.zeros((T, 1), np.int32)
    weights = np.ones((T, 1), np.float32)
    wg = wu = np.ones((E, D, F), np.float32)
    wd = np.ones((E, F, D), np.float32)
    y, stats = LocalExperts(capacity_factor=0.5)(x, ids, weights, wg, wu, wd, np.ones(T, bool))
    assert int(stats.dropped) == 3
    assert np.all(np.asarray(y[0]) > 0) and np.all(np.asarray(y[1:]) == 0)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), [4, 0])  # routed, before the capacity cut


def _rows(n, **settings):
    return SlotRows.build([SamplingParams(seed=i, **settings) for i in range(n)], [4] * n, None, n)


def test_top_p_sampling_never_leaves_the_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (mass before token 1 is 0.5 < 0.7, before 2 is 0.8).
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    tokens = sample(logits, _rows(512, temperature=1.0, top_p=0.7))
    counts = np.bincount(np.asarray(tokens), minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0
    greedy = sample(logits, _rows(512))
    assert np.all(np.asarray(greedy) == 0)


def test_top_k_limits_then_top_p_takes_the_renormalised_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    counts = np.bincount(np.asarray(sample(logits, _rows(512, temperature=1.0, top_k=3))), minlength=4)
    assert counts[3] == 0 and min(counts[:3]) > 0
    assert np.all(np.asarray(sample(logits, _rows(512, temperature=1.0, top_k=1))) == 0)
    # top-3 renormalised: 0.526, 0.316, 0.158; top_p=0.5 then keeps token 0 alone (the mass before token 1 is
    # 0.526 >= 0.5), where top_p=0.5 on the full distribution would keep it alone too, but 0.6 would differ:
    # full: before token 1 is 0.5 < 0.6 (kept); top-3: 0.526 < 0.6 (kept); before token 2: 0.8 vs 0.842 (not).
    assert np.all(np.asarray(sample(logits, _rows(512, temperature=1.0, top_k=3, top_p=0.5))) == 0)
    tokens = np.asarray(sample(logits, _rows(512, temperature=1.0, top_k=2, top_p=0.6)))
    # top-2 renormalised: 0.625, 0.375: the mass before token 1 is 0.625 >= 0.6, so token 0 alone
    assert np.all(tokens == 0)
