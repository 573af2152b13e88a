"""Every model family on a mesh of 8 CPU devices gives the single-device logits: each rule set, EP size in
{2, 4, 8}, pipeline degree in {1, 2, 4}, with the router as initialised and with a skewed router (all router
weights zero: every token ties, and top-k sends every token to the first experts, which all live on device 0).

The default run covers each family on each rule set once; the rest of the grid is marked slow (CI runs it).
Models and shardings are built once per family and mesh, and the skewed router is only a different parameter
value for the same compiled prefill. The grid calls the model as Engine.prefill does (without the KV cache);
the decode test runs Engine.generate on a mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epsjax import sharding
from epsjax import placement
from epsjax.sharding import ragged_emulation
from epsjax.engine import Engine
from epsjax.models import LocalExperts, MoETransformer, get_preset
from epsjax.models.transformer import prefill_mask

FAMILIES = ("tiny-mixtral", "tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-dbrx", "tiny-arctic")
# (rule set, EP size) -> mesh over the 8 devices. Axes a rule set does not use for attention act as data
# parallelism; tp_ep's EP group is expert x tensor.
MESHES = {
    ("tp", 1): dict(data=2, tensor=2, expert=2),
    ("dp", 1): dict(data=8),
    ("tp_ep", 2): dict(data=4, tensor=2),
    ("tp_ep", 4): dict(data=2, tensor=2, expert=2),
    ("tp_ep", 8): dict(tensor=4, expert=2),
    ("dp_ep", 2): dict(data=4, expert=2),
    ("dp_ep", 4): dict(data=2, expert=4),
    ("dp_ep", 8): dict(expert=8),
}
LOGIT_TOL = {"float32": 1e-4}
B, S = 8, 8
# Less LLVM optimisation: compiles about 2.5x faster on CPU, which is what the grid spends its time on.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnames=("graphdef", "experts"), compiler_options=FAST_COMPILE)
def _prefill_logits(graphdef, params, tokens_BT, mask_BT, experts):
    """All-position logits and tokens per expert of a prefill (the model call Engine.prefill makes, no cache)."""
    model = nnx.merge(graphdef, params)
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
    out = model(tokens_BT, positions_BT, mask_BT, prefill_mask(mask_BT), experts=experts)
    return out.logits, out.moe_stats.tokens_per_expert


def _config(family, num_experts=None):
    # Two layers where the family's first layer is dense (DeepSeek-V2, Qwen3 presets), else one MoE layer.
    cfg = get_preset(family)
    return cfg.replace(num_layers=2 if cfg.dense_layers else 1, num_experts=num_experts or cfg.num_experts)


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (B, S)).astype(np.int32)
    mask = np.ones((B, S), bool)
    mask[1, :3] = mask[5, :5] = False  # left padding: never routed, never attended to
    return tokens, mask


def _skewed(state):
    """The same parameters with every router kernel zeroed (placement kept)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if "kernel_DE" in jax.tree_util.keystr(path) else v, state)


@functools.cache
def _reference(family, num_experts=None):
    """Single-device model and its (logits, tokens per expert) with the initialised and the skewed router."""
    cfg = _config(family, num_experts)
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens, mask = _inputs()
    results = {}
    for skew, values in (("initialised", params), ("skewed", _skewed(params))):
        logits, counts = _prefill_logits(graphdef, values, tokens, mask, LocalExperts())
        results[skew] = np.asarray(logits), np.asarray(counts)
    return model, results


@functools.cache
def _sharded_params(family, rule_set, ep, num_experts=None):
    """The model on the mesh, its routed experts in slot order where they do not divide the EP size."""
    model, _ = _reference(family, num_experts)
    mesh = sharding.make_mesh(**MESHES[rule_set, ep])
    sharded = placement.shard_model(model, mesh, rule_set)
    graphdef, params = nnx.split(sharded)
    return mesh, sharded, {"initialised": params, "skewed": _skewed(params)}


def _plan(family, ep, pipeline_degree, num_experts=None):
    local_experts = _config(family, num_experts).num_experts // ep
    return sharding.ExpertPlan(pipeline_degree, "experts" if pipeline_degree <= local_experts else "tokens")


def _check(family, rule_set, ep, pipeline_degree, num_experts=None, transport="auto"):
    mesh, model, params = _sharded_params(family, rule_set, ep, num_experts)
    plan = _plan(family, ep, pipeline_degree, num_experts)
    cfg = _config(family, num_experts)
    experts = sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport=transport,
                                 placement=placement.expert_placement(cfg, mesh, rule_set))
    batch = sharding.batch_sharding(mesh, rule_set)
    _, expected = _reference(family, num_experts)
    tokens, mask = (jax.device_put(a, batch) for a in _inputs())
    what = f"{family} E={cfg.num_experts} {rule_set} EP={ep} {plan} {transport}"
    for skew in ("initialised", "skewed"):
        logits, counts = _prefill_logits(nnx.graphdef(model), params[skew], tokens, mask, experts)
        want_logits, want_counts = expected[skew]
        err = np.abs(np.asarray(logits) - want_logits)[np.asarray(mask)].max()
        assert err < LOGIT_TOL["float32"], f"{what} {skew}: max |logits diff| = {err}"
        np.testing.assert_array_equal(np.asarray(counts), want_counts, err_msg=what)


@pytest.mark.parametrize("family", FAMILIES)
def test_skewed_router_sends_every_token_to_the_first_experts(family):
    cfg = _config(family)
    _, expected = _reference(family)
    counts = expected["skewed"][1]  # [MoE layers, E]
    real_tokens = int(_inputs()[1].sum())
    np.testing.assert_array_equal(counts[:, :cfg.router.top_k], real_tokens)
    assert counts[:, cfg.router.top_k:].sum() == 0


GRID = [(f, rs, ep, pn) for f in FAMILIES for (rs, ep) in MESHES for pn in ((1,) if ep == 1 else (1, 2, 4))]
# One point per family and rule set runs by default: EP=4 with a 2-stage pipeline, EP=8 with 4 stages.
DEFAULT = [(f, rs, ep, pn) for (f, rs, ep, pn) in GRID
           if (rs, ep, pn) in (("tp", 1, 1), ("dp", 1, 1), ("tp_ep", 4, 2), ("dp_ep", 8, 4))]


@pytest.mark.parametrize("family,rule_set,ep,pipeline_degree", DEFAULT)
def test_mesh_matches_single_device(family, rule_set, ep, pipeline_degree):
    _check(family, rule_set, ep, pipeline_degree)


@pytest.mark.slow
@pytest.mark.parametrize("family,rule_set,ep,pipeline_degree", [g for g in GRID if g not in DEFAULT])
def test_mesh_matches_single_device_full_grid(family, rule_set, ep, pipeline_degree):
    _check(family, rule_set, ep, pipeline_degree)


# Expert counts that do not divide the EP size (devices hold floor or ceil of E / P experts, in slot order), through
# the GPU transport: the real jax.lax.ragged_all_to_all, lowered on CPU to sharding.ragged_emulation's emulation.
UNEVEN = [("tiny-mixtral", 6, "dp_ep", 4, 2), ("tiny-deepseek-v2", 12, "tp_ep", 8, 2),
          ("tiny-qwen3-moe", 12, "dp_ep", 8, 4), ("tiny-dbrx", 6, "tp_ep", 4, 2), ("tiny-arctic", 10, "dp_ep", 4, 4)]


@pytest.mark.parametrize("family,num_experts,rule_set,ep,pipeline_degree", UNEVEN)
def test_uneven_experts_through_the_ragged_transport_match_single_device(family, num_experts, rule_set, ep,
                                                                         pipeline_degree):
    with ragged_emulation.emulated_on_cpu():
        _check(family, rule_set, ep, pipeline_degree, num_experts, transport="ragged")


@pytest.mark.slow
@pytest.mark.parametrize("family,num_experts,rule_set,ep,pipeline_degree", UNEVEN)
def test_uneven_experts_through_the_padded_transport_match_single_device(family, num_experts, rule_set, ep,
                                                                         pipeline_degree):
    _check(family, rule_set, ep, pipeline_degree, num_experts, transport="padded")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_transport_matches_single_device(family):
    with ragged_emulation.emulated_on_cpu():
        _check(family, "dp_ep", 8, 4, transport="ragged")


def test_decode_on_a_mesh_matches_single_device():
    """generate (prefill + decode steps, batch sharded, EP pipeline) gives the single-device tokens."""
    model, _ = _reference("tiny-mixtral")
    mesh, sharded, _ = _sharded_params("tiny-mixtral", "tp_ep", 4)
    prompts = [[5, 17, 99], [3, 1, 4, 1, 5], [2, 7], [11] * 6, [8, 9, 10], [100, 200], [42], [7, 7, 7, 7]]
    want = Engine(model).generate(prompts, max_new_tokens=4, stop_at_eos=False).tokens
    engine = Engine(sharded, experts=sharding.EPExperts(mesh=mesh, rule_set="tp_ep",
                                                        plan=sharding.ExpertPlan(2, "tokens")),
                    batch_sharding=sharding.batch_sharding(mesh, "tp_ep"))
    assert engine.generate(prompts, max_new_tokens=4, stop_at_eos=False).tokens == want


def test_replicated_hot_experts_in_a_model_match_single_device():
    """A model placed with replicas of its hottest experts (from the skewed router's counts: everything on the
    first experts) gives the single-device logits and per-expert counts."""
    family, rule_set, ep = "tiny-mixtral", "dp_ep", 4
    model, expected = _reference(family)
    mesh = sharding.make_mesh(**MESHES[rule_set, ep])
    for skew in ("initialised", "skewed"):
        histogram = expected[skew][1].sum(axis=0) + 1  # every expert seen once more: no zero loads
        slots = sharding.replicate_hot_experts(histogram, ep, spare_slots=1)
        assert slots.copies()[1].max() > 1
        placed = placement.shard_model(model, mesh, rule_set, placement=slots)
        graphdef, params = nnx.split(placed)
        params = params if skew == "initialised" else _skewed(params)
        experts = sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=sharding.ExpertPlan(2, "experts"),
                                     placement=slots)
        tokens, mask = (jax.device_put(a, sharding.batch_sharding(mesh, rule_set)) for a in _inputs())
        logits, counts = _prefill_logits(graphdef, params, tokens, mask, experts)
        err = np.abs(np.asarray(logits) - expected[skew][0])[np.asarray(mask)].max()
        assert err < LOGIT_TOL["float32"], (skew, err)
        np.testing.assert_array_equal(np.asarray(counts), expected[skew][1])
