"""Meshes, logical-axis rules and the shard_map expert-parallel MoE.

    mesh = sharding.make_mesh(data=1, tensor=2, expert=4)
    experts = sharding.EPExperts(mesh=mesh, rule_set="tp_ep", plan=sharding.ExpertPlan(pipeline_degree=2))
    engine = Engine(model, experts=experts, batch_sharding=sharding.batch_sharding(mesh, "tp_ep"))

Creating or loading a model's parameters in their shards needs the model, so it lives a layer up, in
epsjax.placement (create_sharded_model, param_shardings, shard_model).
"""

from epsjax.sharding.ep_moe import TRANSPORTS, EPExperts, device_reach
from epsjax.sharding.errors import PlanError
from epsjax.sharding.expert_placement import ExpertPlacement, replicate_hot_experts
from epsjax.sharding.expert_compute import ExpertCompute, MoEStats
from epsjax.sharding.mesh import AXES, DATA, EXPERT, TENSOR, initialize_distributed, make_mesh
from epsjax.sharding.plan import ExpertPlan
from epsjax.sharding.rules import RULE_SETS, Rules, batch_sharding, get_rules, rules_for_model

__all__ = ["AXES", "DATA", "EXPERT", "EPExperts", "ExpertCompute", "ExpertPlacement", "ExpertPlan", "MoEStats",
           "PlanError", "RULE_SETS", "Rules", "TENSOR", "TRANSPORTS", "batch_sharding", "device_reach", "get_rules",
           "initialize_distributed", "make_mesh", "replicate_hot_experts", "rules_for_model"]
