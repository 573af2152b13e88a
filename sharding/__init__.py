"""Meshes, logical-axis rules and the shard_map expert-parallel MoE.

    mesh = sharding.make_mesh(data=1, tensor=2, expert=4)
    model = sharding.create_sharded_model(cfg, mesh, "tp_ep", nnx.Rngs(0))
    experts = sharding.EPExperts(mesh=mesh, rule_set="tp_ep", plan=sharding.ExpertPlan(pipeline_degree=2))
    engine = Engine(model, experts=experts, batch_sharding=sharding.batch_sharding(mesh, "tp_ep"))

models/ imports sharding.axes, and sharding's model-facing parts (params, ep_moe) import models/. So that
`import sharding.axes` does not pull models/ in half-initialised, the names below that live in those modules
are loaded on first access (PEP 562).
"""

import importlib

from sharding.mesh import AXES, DATA, EXPERT, TENSOR, initialize_distributed, make_mesh
from sharding.plan import ExpertPlan
from sharding.rules import RULE_SETS, Rules, get_rules, rules_for_model

_LAZY = {
    "EPExperts": "sharding.ep_moe",
    "TRANSPORTS": "sharding.ep_moe",
    "abstract_shardings": "sharding.params",
    "batch_sharding": "sharding.params",
    "create_sharded_model": "sharding.params",
    "param_shardings": "sharding.params",
    "shard_model": "sharding.params",
}

__all__ = ["AXES", "DATA", "EXPERT", "TENSOR", "ExpertPlan", "RULE_SETS", "Rules", "get_rules",
           "initialize_distributed", "make_mesh", "rules_for_model", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sharding' has no attribute {name!r}")
