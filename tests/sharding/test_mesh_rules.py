"""Meshes, rule tables, parameters created and loaded in their shards, and the errors for invalid combinations."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from epsjax import sharding
from epsjax import placement
from epsjax.checkpoint import load_checkpoint, save_checkpoint
from epsjax.models import MoETransformer, get_preset
from epsjax.sharding import axes


def test_make_mesh_names_and_sizes():
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    assert mesh.axis_names == ("data", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 2, "tensor": 2, "expert": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.make_mesh(expert=2).devices.size == 2  # a sub-mesh of the first devices


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"needs 16 devices, but only 8 cpu device\(s\).*device_count=16"):
        sharding.make_mesh(data=4, expert=4)
    with pytest.raises(ValueError, match="'tensor' must be a positive int"):
        sharding.make_mesh(tensor=0)


def test_rule_tables_cover_every_logical_axis():
    for name, rules in sharding.RULE_SETS.items():
        assert rules.name == name
        for logical in axes.PARAM_AXES + axes.ACTIVATION_AXES:
            rules.mesh_axes(logical)  # raises if missing
    tp_ep = sharding.RULE_SETS["tp_ep"]
    assert tp_ep.spec((axes.EXPERTS, axes.EMBED, axes.EXPERT_MLP)) == P(("expert", "tensor"), None, None)
    assert tp_ep.spec((axes.EMBED, axes.HEADS, axes.HEAD_DIM)) == P(None, "tensor", None)
    assert sharding.RULE_SETS["tp"].spec((axes.EXPERTS, axes.EMBED, axes.EXPERT_MLP)) == P(None, None, "tensor")
    assert sharding.RULE_SETS["dp"].spec((axes.VOCAB, axes.EMBED)) == P(None, None)


def test_rules_reject_bad_tables():
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.Rules.from_dict("bad", {"nonsense": "data"})
    with pytest.raises(ValueError, match="no entry for logical axes"):
        sharding.Rules.from_dict("bad", {"batch": "data"})
    with pytest.raises(ValueError, match="unknown rule set 'ep'"):
        sharding.get_rules("ep")
    overlap = sharding.RULE_SETS["tp"].replace(moe_tokens=("data", "tensor"))
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] split both the experts' FFN dim"):
        sharding.EPExperts(mesh=sharding.make_mesh(tensor=2), rule_set=overlap)


def test_invalid_model_mesh_combinations_are_clear_errors():
    mixtral = get_preset("tiny-mixtral")  # 8 experts, 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"num_experts=8 is fewer than the expert-parallel size 16"):
        sharding.rules_for_model(mixtral.replace(num_experts=8), _fake_mesh(expert=16), "dp_ep")
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by the tensor-parallel size 8"):
        sharding.rules_for_model(mixtral, sharding.make_mesh(tensor=8), "tp_ep")
    # Experts that do not divide the EP size are placed in slots: 6 experts on 4 devices hold 2, 1, 2, 1 of them in
    # 2 slots each, so the stacked expert weights shard evenly.
    slots = placement.expert_placement(mixtral.replace(num_experts=6), sharding.make_mesh(expert=4), "dp_ep")
    assert slots.expert_of_slot().tolist() == [0, -1, 1, 2, 3, -1, 4, 5]
    assert slots.experts_per_device().tolist() == [1, 2, 1, 2]
    expert_tp = sharding.RULE_SETS["dp"].replace(expert_mlp=("tensor",), moe_tokens=("data",), batch=("data",))
    with pytest.raises(ValueError, match=r"\(expert_mlp=96\) does not divide over mesh axes \('tensor',\) \(64 dev"):
        placement.param_shardings(mixtral, _fake_mesh(tensor=64), expert_tp)
    # KV heads that do not divide are replicated instead (2 KV heads, tensor=4).
    rules = sharding.rules_for_model(mixtral, sharding.make_mesh(tensor=4), "tp_ep")
    assert rules.mesh_axes(axes.KV_HEADS) == () and rules.mesh_axes(axes.HEADS) == ("tensor",)


def _fake_mesh(**shape):
    """A mesh bigger than the machine, for shape errors only (an AbstractMesh has no devices)."""
    sizes = {"data": 1, "tensor": 1, "expert": 1, **shape}
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


@functools.cache
def _single_device_params(cfg):
    return dict(nnx.to_flat_state(nnx.state(MoETransformer(cfg, rngs=nnx.Rngs(3)))))


@pytest.mark.parametrize("rule_set,shape", [("tp_ep", dict(tensor=2, expert=4)), ("tp", dict(data=2, tensor=4)),
                                            ("dp_ep", dict(data=2, expert=4))])
def test_created_in_shards_equal_single_device(rule_set, shape):
    cfg = get_preset("tiny-deepseek-v2", num_layers=2)
    mesh = sharding.make_mesh(**shape)
    model = placement.create_sharded_model(cfg, mesh, rule_set, nnx.Rngs(3))
    ref = _single_device_params(cfg)
    where = placement.param_shardings(cfg, mesh, rule_set)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(where(path), value.ndim), path
        # Same random bits; the jitted scale-and-cast may round differently from the eager one (1 ulp).
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref[path].get_value()), rtol=1e-6, atol=1e-9,
                                   err_msg=str(path))
    experts = model.layers[1].moe.w_gate_EDF.get_value()
    local = experts.addressable_shards[0].data.shape
    E = cfg.num_experts
    assert local == {"tp_ep": (E // 8, 64, 32), "tp": (E, 64, 8), "dp_ep": (E // 4, 64, 32)}[rule_set]


def test_load_checkpoint_places_shards(tmp_path):
    cfg = get_preset("tiny-mixtral", num_layers=1)
    model = MoETransformer(cfg, rngs=nnx.Rngs(1))
    save_checkpoint(model, tmp_path)
    mesh = sharding.make_mesh(tensor=2, expert=2)
    where = placement.param_shardings(cfg, mesh, "tp_ep")
    loaded = load_checkpoint(tmp_path, dtype="float32", shardings=where, progress=False)
    w = loaded.layers[0].moe.w_down_EFD.get_value()
    assert w.sharding.spec == P(("expert", "tensor"), None, None)
    assert w.addressable_shards[0].data.shape == (2, 96, 64)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(model.layers[0].moe.w_down_EFD.get_value()))


def test_shard_model_places_an_existing_model():
    cfg = get_preset("tiny-arctic", num_layers=1)
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(data=2, expert=4)
    sharded = placement.shard_model(model, mesh, "dp_ep")
    w = sharded.layers[0].moe.w_up_EDF.get_value()
    assert w.addressable_shards[0].data.shape == (2, 64, 48)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(model.layers[0].moe.w_up_EDF.get_value()))


def test_flax_rules_give_the_same_placement_under_set_mesh():
    """The models' own path: created under jax.set_mesh with flax's logical-axis rules (eager sharding)."""
    cfg = get_preset("tiny-dbrx", num_layers=1)
    mesh = sharding.make_mesh(tensor=2, expert=4)
    rules = sharding.rules_for_model(cfg, mesh, "tp_ep")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.flax_rules()):
        model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    where = placement.param_shardings(cfg, mesh, "tp_ep")
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(where(path), value.ndim), (path, value.sharding, where(path))


def test_batch_sharding():
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    assert sharding.batch_sharding(mesh, "tp_ep").spec == P(("data", "expert"))
    assert sharding.batch_sharding(mesh, "dp_ep").spec == P(("data", "expert", "tensor"))
