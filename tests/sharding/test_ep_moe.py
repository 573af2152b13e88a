"""The EP MoE layer (EPExperts) against the single-device expert compute, over EP sizes, pipeline plans, transports
and routings (random, skewed onto one expert, onto one device, with padding tokens, repeated ids); the transports
against each other (the ragged one through the real jax.lax.ragged_all_to_all, lowered on CPU to an emulation
that poisons its result on a violated precondition); worked examples of the routing arithmetic; what the dispatch
moves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from epsjax import sharding
from epsjax.models import LocalExperts
from epsjax.sharding import ragged_emulation, transports
from epsjax.sharding.ep_moe import destination_of_experts, from_words, stage_route, to_words, token_rows


@pytest.fixture(autouse=True, scope="module")
def _emulated_ragged_all_to_all():
    with ragged_emulation.emulated_on_cpu():
        yield

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
    """x [T, D], ids [T, K] (distinct experts per token, as top-k gives, except for "repeated"), weights [T, K],
    valid [T]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = np.stack([rng.choice(num_experts, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    if kind == "one_expert":  # every token's first choice is the last expert (on the last device)
        ids[:, 0] = num_experts - 1
        ids[:, 1] = rng.integers(0, num_experts - 1, tokens)
    elif kind == "first_experts":  # every token to experts 0 and 1: everything goes to device 0
        ids[:] = [0, 1]
    elif kind == "repeated":  # a token may choose one expert twice (no top-k does, but a caller may)
        ids[::2, 1] = ids[::2, 0]
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    valid = rng.uniform(size=tokens) > 0.3 if kind == "padding" else np.ones(tokens, bool)
    return jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(valid)


ROUTINGS = ("random", "one_expert", "first_experts", "padding", "repeated")


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
    """Both transports match the reference and each other, for every routing."""
    weights = _weights(num_experts, dtype)
    for kind in routings:
        x, ids, w, valid = _routing(kind, tokens=tokens, num_experts=num_experts, dtype=dtype)
        y_ref, stats_ref = _reference()(x, ids, w, *weights, valid)
        outputs = {}
        for transport in ("padded", "ragged"):
            y, stats = _compiled(rule_set, tuple(mesh_shape.items()), plan, transport)(x, ids, w, *weights, valid)
            np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=ATOL[dtype],
                                       rtol=RTOL[dtype], err_msg=f"{rule_set} {mesh_shape} {plan} {transport} {kind}")
            np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
            assert int(stats.dropped) == 0
            outputs[transport] = np.asarray(y)
        # Same rows reach the same kernel in the same order: the transports agree exactly.
        np.testing.assert_array_equal(outputs["padded"], outputs["ragged"], err_msg=kind)


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
    from epsjax.pallas_kernels.chunked_gemm import ChunkTiling

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
    for transport in ("padded", "ragged"):
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


def test_destination_of_experts_worked_example():
    # EP=2, 4 local experts each (experts 0-3 on device 0, 4-7 on device 1), PN=2 stages of 2 experts.
    # Destination = stage * P + peer: stage 0 = experts 0,1 (dev 0) -> 0 and 4,5 (dev 1) -> 1; stage 1 = experts
    # 2,3 (dev 0) -> 2 and 6,7 (dev 1) -> 3. The sentinel (invalid assignments) sorts last.
    destination, stage_index = destination_of_experts(2, 4, ((0, 2), (2, 4)))
    #                           expert: 0  1  2  3  4  5  6  7  sentinel
    np.testing.assert_array_equal(destination, [0, 0, 2, 2, 1, 1, 3, 3, 4])
    np.testing.assert_array_equal(stage_index, [0, 1, 0, 1, 0, 1, 0, 1, -1])


def test_token_rows_worked_example():
    # EP=2, 2 experts per device (E=4), one stage, K=3, so width = min(3, 2) = 2.
    destination, stage_index = (jnp.asarray(a) for a in destination_of_experts(2, 2, ((0, 2),)))
    ids = jnp.array([[0, 1, 3],    # experts 0, 1 on device 0, expert 3 on device 1: two rows
                     [2, 2, 0],    # expert 2 chosen twice: one entry with both weights
                     [1, 0, 2]])   # an invalid (padding) token: no row
    weights = jnp.array([[.5, .3, .2], [.4, .3, .2], [.6, .3, .1]])
    valid = jnp.array([True, True, False])
    dest, local, w, entry_ids = token_rows(ids, weights, valid, destination, stage_index, 2)
    np.testing.assert_array_equal(dest, [[0, 2, 1], [1, 2, 0], [2, 2, 2]])  # 2 = sentinel (unused row)
    np.testing.assert_array_equal(local, [[[0, 1], [-1, -1], [1, -1]],
                                          [[0, -1], [-1, -1], [0, -1]],
                                          [[-1, -1], [-1, -1], [-1, -1]]])
    np.testing.assert_allclose(w, [[[.5, .3], [0, 0], [.2, 0]],
                                   [[.7, 0], [0, 0], [.2, 0]],
                                   [[0, 0], [0, 0], [0, 0]]], rtol=1e-6)
    np.testing.assert_array_equal(entry_ids, [[0, 1, 3], [2, 4, 0], [4, 4, 4]])  # 4 = no entry


def test_dispatch_worked_example():
    # 2 devices with 2 experts each (E=4), K=2, 2 tokens per device; token t on device d has the value 10*d + t/10.
    #   device 0: t0 -> experts 0, 1 (both on device 0): one row; t1 -> experts 1, 3: a row for each device
    #   device 1: t0 -> experts 2, 3 (both on device 1): one row; t1 -> experts 0, 2: a row for each device
    # Sorted by destination (ties in token order): device 0 sends [0.0, 0.1] to device 0 and [0.1] to device 1;
    # device 1 sends [10.1] to device 0 and [10.0, 10.1] to device 1. Six rows, where one per (token, k) is eight.
    mesh = sharding.make_mesh(expert=2)
    ids = jnp.array([[0, 1], [1, 3], [2, 3], [0, 2]], jnp.int32)
    x = jnp.array([0.0, 0.1, 10.0, 10.1])[:, None]

    def dispatch(x, ids, transport):
        destination, stage_index = (jnp.asarray(a) for a in destination_of_experts(2, 2, ((0, 2),)))
        dest, _, _, _ = token_rows(ids, jnp.ones(ids.shape), jnp.ones(2, bool), destination, stage_index, 2)
        order = jnp.argsort(dest.reshape(-1), stable=True)
        counts_PX = jax.lax.all_gather(jnp.zeros(3, jnp.int32).at[dest.reshape(-1)].add(1)[:2], "expert")
        route = stage_route(counts_PX, jax.lax.axis_index("expert"), 0)
        sent = jnp.where((dest.reshape(-1)[order] < 2)[:, None], x[order // 2], -1.0)
        if transport == "padded":
            recv, _ = transports.padded_dispatch(sent, route, 2, "expert")
            back = transports.padded_return(recv, jnp.full_like(sent, -1.0), route, 2, "expert")
        else:
            recv, _ = transports.ragged_dispatch(sent, route, 4, "expert")
            back = transports.ragged_return(recv, jnp.full_like(sent, -1.0), route, "expert")
        return recv, back, sent

    def run(transport):
        f = jax.shard_map(functools.partial(dispatch, transport=transport), mesh=mesh,
                          in_specs=jax.sharding.PartitionSpec("expert"), out_specs=jax.sharding.PartitionSpec("expert"),
                          check_vma=False)
        return [np.asarray(a)[:, 0] for a in jax.jit(f)(x, ids)]

    recv, back, sent = run("padded")  # slots of rows_per_peer = 2 tokens per source, zero-filled
    np.testing.assert_allclose(recv, [0.0, 0.1, 10.1, 0,       # device 0: slot of source 0, of source 1
                                      0.1, 0, 10.0, 10.1])     # device 1
    np.testing.assert_array_equal(back, sent)  # every sent row comes back where it was sent from; -1: not sent
    recv, back, sent = run("ragged")  # packed: source 0's rows, then source 1's
    np.testing.assert_allclose(recv, [0.0, 0.1, 10.1, 0, 0.1, 10.0, 10.1, 0])
    np.testing.assert_array_equal(back, sent)


@pytest.mark.parametrize("dtype, d", [("float32", 5), ("bfloat16", 6), ("bfloat16", 5), ("float16", 3)])
def test_rows_travel_as_int32_words_bit_for_bit(dtype, d):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, d)), dtype).at[0, 0].set(jnp.nan).at[1, 1].set(-0.0)
    words = to_words(x)
    assert words.dtype == jnp.int32 and words.shape == (4, -(-d * jnp.dtype(dtype).itemsize // 4))
    back = from_words(words, d, dtype)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(jax.lax.bitcast_convert_type(back, jnp.uint16 if x.dtype.itemsize == 2 else
                                                               jnp.uint32),
                                  jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32))


def _group_limited_ids(tokens, num_experts, k, groups, topk_group, seed):
    """DeepSeek-V2's device-limited routing: each token's k experts among those of topk_group of the groups."""
    rng = np.random.default_rng(seed)
    per_group = num_experts // groups
    ids = []
    for _ in range(tokens):
        chosen = rng.choice(groups, topk_group, replace=False)
        ids.append(rng.choice((chosen[:, None] * per_group + np.arange(per_group)).reshape(-1), k, replace=False))
    return np.asarray(ids, np.int32)


def test_dispatch_moves_one_row_per_token_and_device():
    """DeepSeek-V2-style routing (32 experts, top-6 within 3 of 8 groups; EP=8 puts one group on each device):
    through the ragged transport, receivers get one row per (token, device) pair, at most half the (token, k)
    assignments, and the return moves as many rows back."""
    num_experts, k, tokens, d = 32, 6, 64, 16
    ids = _group_limited_ids(tokens, num_experts, k, groups=8, topk_group=3, seed=0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    weights = jnp.asarray(rng.dirichlet(np.ones(k), tokens), jnp.float32)
    valid = jnp.ones(tokens, bool)
    w = [jnp.asarray(rng.normal(size=shape) / 4, jnp.float32)
         for shape in ((num_experts, d, 8), (num_experts, d, 8), (num_experts, 8, d))]
    record = []
    with ragged_emulation.emulated_on_cpu(record):
        experts = sharding.EPExperts(mesh=sharding.make_mesh(expert=8), rule_set="dp_ep", transport="ragged")
        y, _ = jax.jit(experts, compiler_options=FAST_COMPILE)(x, jnp.asarray(ids), weights, *w, valid)
        jax.effects_barrier()
    y_ref, _ = _reference()(x, jnp.asarray(ids), weights, *w, valid)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    # The dispatch moves int32 words (the state, its experts' ids and weights), the return float32 states.
    rows = {"ep_dispatch": sum(r for dtype, _, r in record if dtype == "int32"),
            "ep_return": sum(r for dtype, shape, r in record if dtype == "float32" and shape == (d,))}
    pairs = len({(t, e // (num_experts // 8)) for t, row in enumerate(ids) for e in row})
    assert rows["ep_dispatch"] == pairs == rows["ep_return"], (rows, pairs)
    assert pairs / (tokens * k) <= 0.5


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


def test_ragged_output_buffers_vary_over_the_expert_axis():
    x, ids, w, valid = _routing("random")
    experts = sharding.EPExperts(mesh=sharding.make_mesh(data=2, expert=4), rule_set="dp_ep", transport="ragged",
                                 plan=sharding.ExpertPlan(2))
    jaxpr = jax.make_jaxpr(experts)(x, ids, w, *_weights(), valid).jaxpr
    collectives = [e for e in _eqns(jaxpr) if e.primitive.name == "ragged_all_to_all"]
    assert len(collectives) == 2 * 2  # per stage: the rows (with their experts' ids and weights), the return
    for eqn in collectives:
        assert "expert" in eqn.invars[1].aval.mat.varying, eqn


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
