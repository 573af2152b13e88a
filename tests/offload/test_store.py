"""The host expert store: memory kinds, per-expert host arrays, fetches, and stripping experts from a model."""

import jax
import numpy as np
import pytest

from epsjax.offload.runtime import split_experts
from epsjax.offload.store import ExpertStore, host_memory_kind, memory_kinds


def test_cpu_exposes_pinned_host_and_the_store_uses_it():
    device = jax.devices()[0]
    # jax 0.11.2 on CPU: ['device', 'pinned_host', 'unpinned_host'].
    assert {"device", "pinned_host"} <= set(memory_kinds(device))
    assert host_memory_kind(device) == "pinned_host"
    with pytest.raises(ValueError, match="no memory kind"):
        host_memory_kind(device, "hbm")


@pytest.mark.parametrize("kind", ["auto", "unpinned_host", "numpy"])
def test_store_round_trip(kind):
    rng = np.random.default_rng(0)
    E, D, F = 3, 8, 5
    layers = [(rng.standard_normal((E, D, F), np.float32), rng.standard_normal((E, D, F), np.float32),
               rng.standard_normal((E, F, D), np.float32)) for _ in range(2)]
    store = ExpertStore(layers, memory_kind=kind)
    assert store.bytes_per_expert == 3 * D * F * 4 and store.total_bytes == 2 * E * store.bytes_per_expert
    host = store.host((1, 2))
    if kind != "numpy":
        assert all(a.sharding.memory_kind == ("pinned_host" if kind == "auto" else kind) for a in host)
    fetched = store.fetch((1, 2))
    assert all(a.sharding.memory_kind == "device" for a in fetched)
    for got, want in zip(fetched, (layers[1][0][2], layers[1][1][2], layers[1][2][2])):
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(store.stacked(0)[2], layers[0][2])


def test_store_rejects_mismatched_shapes():
    w = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ValueError, match="w_down"):
        ExpertStore([(w, w, w)])


def test_split_experts_strips_only_routed_expert_weights(tiny_model):
    graphdef, state, weights = split_experts(tiny_model)
    cfg = tiny_model.cfg
    assert len(weights) == len(cfg.moe_layers)
    np.testing.assert_array_equal(weights[1][0], np.asarray(tiny_model.layers[1].moe.w_gate_EDF[...]))
    sizes = {jax.tree_util.keystr(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(state)}
    stripped = [k for k, n in sizes.items() if n == 0]
    assert len(stripped) == 3 * len(cfg.moe_layers) and all("_E" in k for k in stripped)
    assert any("router" in k and n > 0 for k, n in sizes.items())
