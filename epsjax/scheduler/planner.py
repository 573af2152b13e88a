"""What the runtime calls: `plan_for` (one plan for a model, mesh, batch and load) and `Planner` (plans per
batch-size bucket, re-planned when the routing histogram drifts).

    plan = plan_for(cfg, {"data": 1, "tensor": 1, "expert": 8}, batch=64, seq_len=1024, hardware="h800")
    experts = sharding.EPExperts(mesh, rule_set="dp_ep", plan=plan)          # plan: sharding.plan.ExpertPlan

    planner = Planner(cfg, mesh.shape, rule_set="dp_ep")                      # hardware from jax.devices()
    plan = planner.plan(batch, seq_len)                                      # cached per token bucket
    ...; planner.observe(out.moe_stats)                                      # after each step
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Mapping

import numpy as np
from epsjax.models.config import ModelConfig

from epsjax.scheduler.costs import CostModel
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.hardware import Hardware, get_hardware, hardware_for_device_kind
from epsjax.scheduler.histogram import RoutingHistogram
from epsjax.scheduler.plan import Plan
from epsjax.scheduler.schedules import Layout, Workload
from epsjax.scheduler.search import PlanChoice, search_plan



def layout_for(cfg: ModelConfig, mesh_shape, rule_set: str | None = None) -> tuple[Layout, int]:
    """(Layout of one EP group, number of such replicas) for a mesh and a rules table name.

    mesh_shape: a device count (all expert-parallel), {"data": d, "tensor": t, "expert": e} (sharding.mesh
    axes; Mesh.shape works), or (data, tensor, expert). Rules (sharding/rules.py): "tp_ep" runs attention TP
    over "tensor"; "dp_ep" runs it data-parallel; "tp" is TP+TP over "tensor"; the MoE's EP group is
    ("expert", "tensor") and "data" replicates it. Default: "tp_ep" when tensor > 1, else "dp_ep".
    """
    if isinstance(mesh_shape, int):
        data, tensor, expert = 1, 1, mesh_shape
    elif isinstance(mesh_shape, Mapping):
        data, tensor, expert = (int(mesh_shape.get(k, 1)) for k in ("data", "tensor", "expert"))
    else:
        data, tensor, expert = (int(x) for x in mesh_shape)
    rule_set = rule_set or ("tp_ep" if tensor > 1 else "dp_ep")
    if rule_set == "tp":
        return Layout(tensor, tensor, "tp"), data * expert
    if rule_set == "dp":
        return Layout(1, 1, "tp"), data * tensor * expert
    if rule_set not in ("tp_ep", "dp_ep"):
        raise ScheduleError(f"unknown rule set {rule_set!r}; expected tp, dp, tp_ep or dp_ep")
    devices = tensor * expert
    return Layout(devices, tensor if rule_set == "tp_ep" else 1, "ep"), data


def resolve_hardware(hardware: "str | Hardware | None") -> Hardware | None:
    """A preset by name, or the default jax device's (None when no preset matches it, e.g. CPU)."""
    if hardware is not None:
        return get_hardware(hardware)
    import jax

    return hardware_for_device_kind(jax.devices()[0].device_kind)


def _loads(cfg: ModelConfig, tokens_per_expert) -> tuple[tuple[float, ...] | None, np.ndarray | None]:
    """(shares for the workload, per-layer shares or None) from counts [E], [L_moe, E], a histogram or None."""
    if tokens_per_expert is None:
        return None, None
    if isinstance(tokens_per_expert, RoutingHistogram):
        layers = tokens_per_expert.shares()
    else:
        layers = np.asarray(getattr(tokens_per_expert, "tokens_per_expert", tokens_per_expert), dtype=np.float64)
    if layers.ndim == 1:
        return tuple(layers / layers.sum()), None
    if layers.shape != (len(cfg.moe_layers), cfg.num_experts):
        raise ScheduleError(f"tokens_per_expert must be [{cfg.num_experts}] or [{len(cfg.moe_layers)}, "
                            f"{cfg.num_experts}], got {layers.shape}")
    layers = layers / np.maximum(layers.sum(axis=1, keepdims=True), 1e-30)
    return tuple(layers.mean(axis=0)), layers


def search_for(cfg: ModelConfig, mesh_shape, batch: int, seq_len: int, tokens_per_expert=None, hardware=None, *,
               rule_set: str | None = None, context: int = 0, profile_dir=None) -> PlanChoice | None:
    """The full search result (PlanChoice) behind plan_for, or None where no hardware preset applies."""
    hw = resolve_hardware(hardware)
    if hw is None:
        return None
    layout, replicas = layout_for(cfg, mesh_shape, rule_set)
    shares, layers = _loads(cfg, tokens_per_expert)
    tokens = max(layout.devices, math.ceil(batch * seq_len / replicas))
    w = Workload(cfg, layout, tokens, seq_len, context, shares)
    return search_plan(w, CostModel.build(hw, cfg.dtype, profile_dir=profile_dir), layer_loads=layers)


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """One plan search for a prefill and what it predicts: `choice` (search_for's PlanChoice: the plan, the simulated
    MoE layer time, the search's seconds), `prefill_s` (predict_prefill: the whole prefill under choice.plan) and the
    cost model both came from."""

    choice: PlanChoice
    prefill_s: float
    costs: CostModel

    @property
    def calibrated(self) -> bool:
        """Whether the cost model holds constants measured on this device kind (epsjax/scheduler/calibration.py)."""
        return any(str(v).startswith("calibrated") for v in dict(self.costs.hw.sources).values())


def plan_prefill(cfg: ModelConfig, mesh_shape, batch: int, seq_len: int, hardware=None, *,
                 rule_set: str | None = None) -> PrefillPlan | None:
    """search_for and predict_prefill of its plan with one cost model (the same numbers as calling both, one search
    and one cost-model build), or None where the device has no cost model."""
    from epsjax.scheduler.step import simulate_step

    hw = resolve_hardware(hardware)
    if hw is None:
        return None
    layout, replicas = layout_for(cfg, mesh_shape, rule_set)
    tokens = max(layout.devices, math.ceil(batch * seq_len / replicas))
    w = Workload(cfg, layout, tokens, seq_len)
    costs = CostModel.build(hw, cfg.dtype)
    choice = search_plan(w, costs)
    return PrefillPlan(choice, simulate_step(w, costs, choice.plan).step_s, costs)


def predict_prefill(cfg: ModelConfig, mesh_shape, batch: int, seq_len: int, plan: Plan = Plan(), hardware=None, *,
                    rule_set: str | None = None) -> tuple[float, CostModel] | None:
    """(seconds, cost model) of a whole prefill of batch x seq_len tokens under `plan` (simulate_step: every
    layer's simulated time plus the logits), or None where the device has no cost model."""
    from epsjax.scheduler.step import simulate_step

    hw = resolve_hardware(hardware)
    if hw is None:
        return None
    layout, replicas = layout_for(cfg, mesh_shape, rule_set)
    tokens = max(layout.devices, math.ceil(batch * seq_len / replicas))
    costs = CostModel.build(hw, cfg.dtype)
    return simulate_step(Workload(cfg, layout, tokens, seq_len), costs, plan).step_s, costs


def plan_for(cfg: ModelConfig, mesh_shape, batch: int, seq_len: int, tokens_per_expert=None, hardware=None, *,
             rule_set: str | None = None, context: int = 0, profile_dir=None):
    """The sharding.plan.ExpertPlan the scheduler picks for a prefill step of `batch` sequences of `seq_len`
    tokens (over the whole mesh) after `context` cached tokens.

    tokens_per_expert: measured routing counts ([E], [L_moe, E], MoEStats or a RoutingHistogram) or None
    (uniform routing). hardware: a preset name / Hardware, or None for the default jax device's kind (with its
    calibration, epsjax/scheduler/calibration.py). On a device with neither a preset nor a calibration it returns
    the unpipelined default ExpertPlan().
    """
    choice = search_for(cfg, mesh_shape, batch, seq_len, tokens_per_expert, hardware, rule_set=rule_set,
                        context=context, profile_dir=profile_dir)
    if choice is None:
        return Plan().to_expert_plan()
    return choice.plan.to_expert_plan()


def token_bucket(tokens: int) -> int:
    """Batches are planned per power-of-two bucket of tokens (the bucket's upper end)."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


@dataclasses.dataclass
class Planner:
    """Plans per token bucket for one model and mesh, re-planning when the routing histogram drifts by more
    than `replan_distance` (total variation, worst layer) from the one a cached plan was made for.

    force: an ExpertPlan (or Plan) to return always: the runtime's override flag.
    """

    cfg: ModelConfig
    mesh_shape: object
    rule_set: str | None = None
    hardware: object = None
    replan_distance: float = 0.05
    decay: float = 0.9
    force: object = None
    profile_dir: object = None

    def __post_init__(self):
        self.histogram = RoutingHistogram(len(self.cfg.moe_layers), self.cfg.num_experts, decay=self.decay)
        self._cache: dict[int, tuple[np.ndarray | None, PlanChoice | None]] = {}
        self.last_search_seconds = 0.0

    def observe(self, tokens_per_expert) -> None:
        """Feeds one step's routing counts (MoEStats or its tokens_per_expert array)."""
        self.histogram.update(tokens_per_expert)

    def choice(self, batch: int, seq_len: int, context: int = 0) -> PlanChoice | None:
        bucket = token_bucket(batch * seq_len)
        seen = self.histogram.shares() if self.histogram.updates else None
        cached = self._cache.get(bucket)
        if cached is not None:
            made_for, choice = cached
            fresh = (made_for is None and seen is None) or (
                made_for is not None and seen is not None and self.histogram.distance(made_for) <= self.replan_distance)
            if fresh:
                return choice
        t0 = time.perf_counter()
        choice = search_for(self.cfg, self.mesh_shape, bucket // seq_len or 1, seq_len,
                            self.histogram if seen is not None else None, self.hardware, rule_set=self.rule_set,
                            context=context, profile_dir=self.profile_dir)
        self.last_search_seconds = time.perf_counter() - t0
        self._cache[bucket] = (seen, choice)
        return choice

    def plan(self, batch: int, seq_len: int, context: int = 0):
        """The ExpertPlan for this step (the forced one if set)."""
        if self.force is not None:
            return self.force.to_expert_plan() if isinstance(self.force, Plan) else self.force
        choice = self.choice(batch, seq_len, context)
        return Plan().to_expert_plan() if choice is None else choice.plan.to_expert_plan()
