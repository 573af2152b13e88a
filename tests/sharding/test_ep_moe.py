"""The EP MoE layer (EPExperts) against the single-device expert compute, over EP sizes, pipeline plans, transports
and routings (random, skewed onto one expert, onto one device, with padding tokens); the transports against
each other; worked examples of the routing arithmetic."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sharding
from models import LocalExperts
from sharding import ragged_emulation, transports
from sharding.ep_moe import destination_keys, stage_route

E, D, F, K, T = 16, 32, 24, 2, 64
ATOL = {"float32": 1e-5, "bfloat16": 5e-2}
RTOL = {"float32": 1e-5, "bfloat16": 5e-2}


def _weights(num_experts=E, dtype="float32"):
    keys = jax.random.split(jax.random.key(7), 3)
    w_gate = jax.random.normal(keys[0], (num_experts, D, F)) / 4
    w_up = jax.random.normal(keys[1], (num_experts, D, F)) / 4
    w_down = jax.random.normal(keys[2], (num_experts, F, D)) / 4
    return tuple(w.astype(dtype) for w in (w_gate, w_up, w_down))


def _routing(kind: str, seed: int = 0, tokens=T, num_experts=E, dtype="float32"):
    """x [T, D], ids [T, K] (distinct experts per token, as top-k gives), weights [T, K], valid [T]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = np.stack([rng.choice(num_experts, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    if kind == "one_expert":  # every token's first choice is the last expert (on the last device)
        ids[:, 0] = num_experts - 1
        ids[:, 1] = rng.integers(0, num_experts - 1, tokens)
    elif kind == "first_experts":  # every token to experts 0 and 1: everything goes to device 0
        ids[:] = [0, 1]
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    valid = rng.uniform(size=tokens) > 0.3 if kind == "padding" else np.ones(tokens, bool)
    return jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(valid)


ROUTINGS = ("random", "one_expert", "first_experts", "padding")


# Less LLVM optimisation: compiles about 2.5x faster on CPU, which is what these tests spend their time on.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _reference():
    return jax.jit(LocalExperts(backend="reference"), compiler_options=FAST_COMPILE)


@functools.cache
def _compiled(rule_set, mesh_shape, plan, transport):
    mesh = sharding.make_mesh(**dict(mesh_shape))
    return jax.jit(sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport=transport),
                   compiler_options=FAST_COMPILE)


def _check(rule_set, mesh_shape, plan, routings=ROUTINGS, num_experts=E, tokens=T, dtype="float32"):
    """Both CPU-runnable transports match the reference and each other, for every routing."""
    weights = _weights(num_experts, dtype)
    for kind in routings:
        x, ids, w, valid = _routing(kind, tokens=tokens, num_experts=num_experts, dtype=dtype)
        y_ref, stats_ref = _reference()(x, ids, w, *weights, valid)
        outputs = {}
        for transport in ("padded", "ragged_reference"):
            y, stats = _compiled(rule_set, tuple(mesh_shape.items()), plan, transport)(x, ids, w, *weights, valid)
            np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=ATOL[dtype],
                                       rtol=RTOL[dtype], err_msg=f"{rule_set} {mesh_shape} {plan} {transport} {kind}")
            np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
            assert int(stats.dropped) == 0
            outputs[transport] = np.asarray(y)
        # Same rows reach the same kernel in the same order: the transports agree exactly.
        np.testing.assert_array_equal(outputs["padded"], outputs["ragged_reference"], err_msg=kind)


PLANS = [sharding.ExpertPlan(1), sharding.ExpertPlan(2, "experts"), sharding.ExpertPlan(2, "tokens"),
         sharding.ExpertPlan(4, "tokens"), sharding.ExpertPlan(4, "experts")]


GRID = [(ep, plan) for ep in (2, 4, 8) for plan in PLANS
        if not (plan.split == "experts" and plan.pipeline_degree > E // ep)]  # too few experts: an error (below)
DEFAULT = [(2, PLANS[0]), (4, PLANS[1]), (8, PLANS[3])]


def _grid_id(case):
    ep, plan = case
    return f"EP{ep}-PN{plan.pipeline_degree}-{plan.split}"


@pytest.mark.parametrize("case", DEFAULT, ids=_grid_id)
def test_ep_matches_single_device(case):
    ep, plan = case
    _check("dp_ep", dict(data=8 // ep, expert=ep), plan)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GRID if c not in DEFAULT], ids=_grid_id)
def test_ep_matches_single_device_full_grid(case):
    ep, plan = case
    _check("dp_ep", dict(data=8 // ep, expert=ep), plan)


def test_per_stage_backends_and_tilings():
    from pallas_kernels.chunked_gemm import ChunkTiling

    plan = sharding.ExpertPlan(2, "experts", backends=("chunked", "ragged_dot"), tilings=(ChunkTiling(8), None))
    _check("dp_ep", dict(data=2, expert=4), plan, routings=("random", "one_expert"))


def test_ep_size_one_and_expert_tensor_parallel():
    _check("dp_ep", dict(data=8), sharding.ExpertPlan(2, "experts"), routings=("random", "padding"))
    # "tp": each expert's FFN dim split over tensor=2, outputs psum'd; tokens split over data x expert.
    _check("tp", dict(data=2, tensor=2, expert=2), sharding.ExpertPlan(2, "tokens"), routings=("one_expert",))
    # "tp_ep": the EP group spans two mesh axes, (expert, tensor) = 2 x 2.
    _check("tp_ep", dict(data=2, tensor=2, expert=2), sharding.ExpertPlan(2, "experts"))


def test_uneven_expert_groups_and_token_padding():
    # 12 experts over EP=4: 3 per device, PN=2 stages of 1 and 2 experts.
    assert sharding.ExpertPlan(2).expert_groups(3) == ((0, 1), (1, 3))
    _check("dp_ep", dict(data=2, expert=4), sharding.ExpertPlan(2), num_experts=12)
    # 60 tokens over 8 shards x 2 chunks: padded to 64 inside, sliced back.
    _check("dp_ep", dict(data=2, expert=4), sharding.ExpertPlan(2, "tokens"), routings=("padding",), tokens=60)


def test_bfloat16():
    _check("dp_ep", dict(data=2, expert=4), sharding.ExpertPlan(2), routings=("random", "one_expert"),
           dtype="bfloat16")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), hot=st.integers(0, E - 1), hot_fraction=st.floats(0, 1),
       invalid_fraction=st.floats(0, 1))
def test_random_routings(seed, hot, hot_fraction, invalid_fraction):
    """Any routing (a hot expert taking a fraction of first choices, any padding) goes through without a drop."""
    rng = np.random.default_rng(seed)
    x, ids, w, _ = _routing("random", seed)
    ids = np.asarray(ids).copy()
    take = rng.uniform(size=T) < hot_fraction
    ids[take, 0] = hot
    ids[take, 1] = np.where(ids[take, 1] == hot, (hot + 1) % E, ids[take, 1])
    valid = jnp.asarray(rng.uniform(size=T) >= invalid_fraction)
    weights = _weights()
    y_ref, stats_ref = _reference()(x, ids, w, *weights, valid)
    for transport in ("padded", "ragged_reference"):
        y, stats = _compiled("dp_ep", (("data", 2), ("expert", 4)), sharding.ExpertPlan(2), transport)(
            x, jnp.asarray(ids), w, *weights, valid)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)


def test_plan_and_transport_errors():
    mesh = sharding.make_mesh(expert=8)
    x, ids, w, valid = _routing("random")
    experts = sharding.EPExperts(mesh=mesh, rule_set="dp_ep", plan=sharding.ExpertPlan(4, "experts"))
    with pytest.raises(ValueError, match="needs at least 4 experts per device, but there are 2; use split='tokens'"):
        experts(x, ids, w, *_weights(), valid)
    with pytest.raises(ValueError, match="transport must be one of"):
        sharding.EPExperts(mesh=mesh, transport="nccl")
    with pytest.raises(ValueError, match="split must be one of"):
        sharding.ExpertPlan(2, "layers")
    with pytest.raises(ValueError, match="backends must have 1 or pipeline_degree=2 entries"):
        sharding.ExpertPlan(2, backends=("auto", "dense", "chunked"))
    with pytest.raises(ValueError, match="unknown backends"):
        sharding.ExpertPlan(1, backends=("cublas",))
    assert sharding.EPExperts(mesh=mesh).resolved_transport == "padded"  # CPU
    assert sharding.EPExperts(mesh=mesh, rule_set="dp").resolved_transport == "padded"  # no EP axes


# Worked examples ------------------------------------------------------------------------------------------------


def test_destination_keys_worked_example():
    # EP=2, 4 local experts each (experts 0-3 on device 0, 4-7 on device 1), PN=2 stages of 2 experts.
    # Keys order rows by stage, then peer, then expert: stage 0 = experts 0,1 (dev 0), 4,5 (dev 1); stage 1 =
    # experts 2,3 (dev 0), 6,7 (dev 1). The sentinel (invalid assignments) sorts last.
    keys = destination_keys(2, 4, ((0, 2), (2, 4)))
    #                    expert: 0  1  2  3  4  5  6  7  sentinel
    np.testing.assert_array_equal(keys, [0, 1, 4, 5, 2, 3, 6, 7, 8])


def test_dispatch_worked_example():
    # 2 devices with 2 experts each (E=4), K=1, 3 tokens per device; token t on device d has the value 10*d + t.
    # Device 0 routes its tokens to experts [3, 0, 2], device 1 to [1, 1, 3]. Sorted by expert:
    #   device 0: t1 (e0) | t2 (e2), t0 (e3)      -> sends 1 row to device 0, 2 rows to device 1
    #   device 1: t0, t1 (e1) | t2 (e3)           -> sends 2 rows to device 0, 1 row to device 1
    # Device 0 receives [0.1 | 10.0, 10.1] (source 0's rows first), device 1 receives [0.2, 0.0 | 10.2].
    # Padded slots hold rows_per_peer = 3 tokens * min(K=1, 2 experts) = 3 rows per source, zero-filled.
    mesh = sharding.make_mesh(expert=2)
    ids = jnp.array([3, 0, 2, 1, 1, 3], jnp.int32)
    x = jnp.array([0.0, 0.1, 0.2, 10.0, 10.1, 10.2])[:, None]

    def dispatch(x, ids, transport):
        keys = jnp.asarray(destination_keys(2, 2, ((0, 2),)))[ids]
        order = jnp.argsort(keys, stable=True)
        counts_PE = jax.lax.all_gather(jnp.zeros(4, jnp.int32).at[keys].add(1), "expert")
        me = jax.lax.axis_index("expert")
        route, recv_counts = stage_route(counts_PE, me, 0, 2)
        if transport == "padded":
            recv, _ = transports.padded_dispatch(x[order], route, 3, "expert")
        else:
            recv, _ = transports.ragged_dispatch(x[order], route, 6, "expert",
                                                 collective=ragged_emulation.ragged_all_to_all)
        back = jnp.zeros_like(x)
        if transport == "padded":
            back = transports.padded_return(recv, back, route, 3, "expert")
        else:
            back = transports.ragged_return(recv, back, route, "expert",
                                            collective=ragged_emulation.ragged_all_to_all)
        return recv, recv_counts.reshape(-1), back, x[order]

    def run(transport):
        f = jax.shard_map(functools.partial(dispatch, transport=transport), mesh=mesh,
                          in_specs=jax.sharding.PartitionSpec("expert"), out_specs=jax.sharding.PartitionSpec("expert"),
                          check_vma=False)
        return [np.asarray(a) for a in jax.jit(f)(x, ids)]

    recv, recv_counts, back, sent = run("padded")
    np.testing.assert_allclose(recv[:, 0], [0.1, 0, 0, 10.0, 10.1, 0,      # device 0: slot of source 0, of source 1
                                            0.2, 0.0, 0, 10.2, 0, 0])     # device 1
    # Rows per (source, local expert): device 0 gets e0: 1 from source 0, e1: 2 from source 1; device 1 gets
    # e2: 1 and e3: 1 from source 0, e3: 1 from source 1.
    np.testing.assert_array_equal(recv_counts, [1, 0, 0, 2, 1, 1, 0, 1])
    np.testing.assert_array_equal(back, sent)  # the return trip puts every row back where it was sent from
    recv, _, back, sent = run("ragged")
    np.testing.assert_allclose(recv[:, 0], [0.1, 10.0, 10.1, 0, 0, 0, 0.2, 0.0, 10.2, 0, 0, 0])
    np.testing.assert_array_equal(back, sent)


def test_ragged_reference_reproduces_the_jax_docstring_example_with_integers():
    mesh = sharding.make_mesh(expert=2)
    operand = jnp.array([1, 2, 2, 3, 4, 0])
    output = jnp.zeros(8, operand.dtype)
    input_offsets, send_sizes = jnp.array([0, 1, 0, 1]), jnp.array([1, 2, 1, 1])
    output_offsets, recv_sizes = jnp.array([0, 0, 1, 2]), jnp.array([1, 1, 2, 1])
    f = jax.shard_map(functools.partial(ragged_emulation.ragged_all_to_all, axis_name="expert"), mesh=mesh,
                      in_specs=jax.sharding.PartitionSpec("expert"), out_specs=jax.sharding.PartitionSpec("expert"),
                      check_vma=False)
    result = jax.jit(f)(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    np.testing.assert_array_equal(result, [1, 3, 0, 0, 2, 2, 4, 0])


# GPU ------------------------------------------------------------------------------------------------------------


def _on_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU (XLA:CPU does not implement ragged_all_to_all); run "
                                          "JAX_PLATFORMS=cuda,cpu pytest -m gpu tests/sharding")
def test_ragged_transport_on_gpu_matches_padded():
    gpus = jax.devices("gpu")
    mesh = sharding.make_mesh(expert=len(gpus), devices=gpus)
    weights = [jax.device_put(w, gpus[0]) for w in _weights()]
    for plan in (sharding.ExpertPlan(1), sharding.ExpertPlan(2, "experts"), sharding.ExpertPlan(2, "tokens")):
        for kind in ROUTINGS:
            args = [jax.device_put(a, gpus[0]) for a in _routing(kind)]
            x, ids, w, valid = args
            ys = {t: jax.jit(sharding.EPExperts(mesh=mesh, plan=plan, transport=t))(x, ids, w, *weights, valid)[0]
                  for t in ("ragged", "padded")}
            np.testing.assert_allclose(np.asarray(ys["ragged"]), np.asarray(ys["padded"]), atol=1e-5, rtol=1e-5,
                                       err_msg=f"{plan} {kind}")
            y_ref, _ = jax.jit(LocalExperts(backend="reference"))(x, ids, w, *weights, valid)
            np.testing.assert_allclose(np.asarray(ys["ragged"]), np.asarray(y_ref), atol=1e-4, rtol=1e-4)
