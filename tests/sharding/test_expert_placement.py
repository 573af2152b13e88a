"""sharding.expert_placement: slot layouts for any expert count, and EPLB-style replicas of hot experts (balance on
skewed histograms, exact outputs through the EP layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epsjax import sharding
from epsjax.models import LocalExperts
from epsjax.sharding import ExpertPlacement, PlanError, ragged_emulation, replicate_hot_experts


def _zipf(num_experts, s, seed=None):
    h = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    return h if seed is None else h[np.random.default_rng(seed).permutation(num_experts)]


@pytest.mark.parametrize("num_experts, devices", [(6, 4), (10, 4), (12, 8), (60, 8), (64, 8), (8, 8), (7, 2)])
def test_contiguous_layout_gives_every_device_floor_or_ceil_of_the_experts(num_experts, devices):
    p = ExpertPlacement(num_experts, devices)
    table = p.expert_of_slot()
    assert len(table) == devices * -(-num_experts // devices)
    assert sorted(table[table >= 0].tolist()) == list(range(num_experts))  # each expert exactly once
    assert set(p.experts_per_device().tolist()) <= {num_experts // devices, -(-num_experts // devices)}
    assert p.identity == (num_experts % devices == 0)


def test_slot_weights_and_counts_round_trip():
    p = replicate_hot_experts(_zipf(10, 1.2), 4, spare_slots=1)
    w = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
    slots = np.asarray(p.to_slots(w))
    table = p.expert_of_slot()
    for s, e in enumerate(table):
        np.testing.assert_array_equal(slots[s], w[e] if e >= 0 else 0)
    np.testing.assert_array_equal(p.per_expert(jnp.ones(p.num_slots, jnp.int32)),
                                  np.bincount(table[table >= 0], minlength=10))


def test_replica_choice_splits_a_hot_experts_tokens_evenly():
    p = replicate_hot_experts(np.array([100.0, 1, 1, 1, 1, 1, 1, 1]), 4, spare_slots=1)
    slots_ER, count_E = p.copies()
    assert count_E[0] == 4  # the hot expert gets a copy on every device
    slot_T = np.asarray(p.slot_ids(jnp.zeros((400, 1), jnp.int32)))[:, 0]
    np.testing.assert_array_equal(np.bincount(slot_T, minlength=p.num_slots)[slots_ER[0]], [100] * 4)
    assert len({s // p.slots for s in slots_ER[0]}) == 4  # on four different devices


def test_replicas_balance_a_zipf_histogram():
    """Zipf(1.2) over 64 experts on 8 devices: the contiguous layout's busiest device carries several times the
    mean; one spare slot per device of replicas brings it within 1.15 of the mean."""
    for seed in (None, 0, 1):
        histogram = _zipf(64, 1.2, seed)
        before = ExpertPlacement(64, 8).imbalance(histogram)
        unreplicated = replicate_hot_experts(histogram, 8, spare_slots=0).imbalance(histogram)
        after = replicate_hot_experts(histogram, 8, spare_slots=1).imbalance(histogram)
        assert before > 2.0 and unreplicated > 2.0  # the hottest expert alone is ~2x a device's mean share
        assert after <= 1.15, (seed, before, unreplicated, after)


def test_placement_is_a_pure_function_of_the_histogram():
    h = _zipf(32, 1.1, seed=3)
    assert replicate_hot_experts(h, 8, 2) == replicate_hot_experts(h.copy(), 8, 2)


def test_bad_placements_are_one_line_errors():
    with pytest.raises(PlanError, match=r"4 experts cannot be spread over 8 expert-parallel devices"):
        ExpertPlacement(4, 8)
    with pytest.raises(PlanError, match=r"leaves experts \[3\] without a slot"):
        ExpertPlacement(4, 2, (0, 1, 2, -1))
    with pytest.raises(PlanError, match=r"needs a multiple of 2 slots"):
        ExpertPlacement(3, 2, (0, 1, 2))
    with pytest.raises(PlanError, match=r"finite, non-negative"):
        replicate_hot_experts([1.0, -1.0, 2.0, 3.0], 2)
    experts = sharding.EPExperts(mesh=sharding.make_mesh(expert=4), placement=ExpertPlacement(8, 2))
    with pytest.raises(PlanError, match=r"spreads experts over 2 devices, but the expert-parallel size is 4"):
        experts.expert_placement(8)


E, D, F, K, T = 12, 16, 8, 3, 96


def _layer_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    # Skewed routing: expert 0 in almost every token's top-k.
    ids = np.stack([rng.choice(E, K, replace=False, p=_zipf(E, 1.5) / _zipf(E, 1.5).sum()) for _ in range(T)])
    weights = jnp.asarray(rng.dirichlet(np.ones(K), T), jnp.float32)
    w = [jnp.asarray(rng.normal(size=shape) / 4, jnp.float32) for shape in ((E, D, F), (E, D, F), (E, F, D))]
    return x, jnp.asarray(ids, jnp.int32), weights, w, jnp.ones(T, bool)


@pytest.mark.parametrize("transport", ["padded", "ragged"])
@pytest.mark.parametrize("plan", [sharding.ExpertPlan(1), sharding.ExpertPlan(2, "experts"),
                                  sharding.ExpertPlan(2, "tokens")])
def test_replicated_experts_leave_the_output_unchanged(transport, plan):
    x, ids, weights, w, valid = _layer_inputs()
    histogram = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    placement = replicate_hot_experts(histogram, 4, spare_slots=1)
    assert placement.copies()[1].max() > 1  # the hot experts are replicated
    y_ref, stats_ref = jax.jit(LocalExperts(backend="reference"))(x, ids, weights, *w, valid)
    with ragged_emulation.emulated_on_cpu():
        experts = sharding.EPExperts(mesh=sharding.make_mesh(data=2, expert=4), plan=plan, transport=transport,
                                     placement=placement)
        for weights_as in ("canonical", "slots"):  # [E, ...] copied into slot order per call, or placed once
            ws = w if weights_as == "canonical" else [placement.to_slots(a) for a in w]
            y, stats = jax.jit(experts)(x, ids, weights, *ws, valid)
            np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert),
                                          np.asarray(stats_ref.tokens_per_expert))


def test_a_placed_model_refuses_an_expert_compute_without_its_placement():
    from flax import nnx

    from epsjax import placement
    from epsjax.checkpoint import CheckpointError, save_checkpoint
    from epsjax.models import MoETransformer, get_preset
    from epsjax.models.transformer import prefill_mask

    cfg = get_preset("tiny-mixtral", num_experts=6, num_layers=1)
    mesh = sharding.make_mesh(expert=4)
    model = placement.shard_model(MoETransformer(cfg, rngs=nnx.Rngs(0)), mesh, "dp_ep")
    assert model.layers[0].moe.w_gate_EDF.shape[0] == 8  # 4 devices x 2 slots
    tokens = jnp.ones((4, 4), jnp.int32)
    positions, mask = jnp.broadcast_to(jnp.arange(4), (4, 4)), jnp.ones((4, 4), bool)
    for experts in (LocalExperts(), sharding.EPExperts(mesh=mesh)):
        with pytest.raises(PlanError, match=r"hold 8 slots for 6 experts .* has no placement"):
            model(tokens, positions, mask, prefill_mask(mask), experts=experts)
    with pytest.raises(CheckpointError, match=r"holds 8 expert slots, not the model's 6 experts"):
        save_checkpoint(model, "/nonexistent/never-written")
