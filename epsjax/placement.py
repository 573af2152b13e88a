"""Parameters in their shards: creation and checkpoint placement for one rule set of sharding/.

`create_sharded_model` builds the model inside one jit whose outputs are constrained to the rule set's
shardings, so XLA generates each device's shard of each parameter on that device (jax's threefry is
partitionable: the values equal an unsharded model's from the same rngs). No parameter exists whole on one
device. `param_shardings` gives `epsjax.checkpoint.load_checkpoint` the same placement per parameter path.

`place` derives all of it once (rules_for_model, the expert slots, the abstract model, every parameter's sharding)
as a `ParamPlacement`, which the weights (create_model / shard / sharding + layout for a load) and the expert
compute (ep_experts) share; the functions of one job each above are thin over it. `choose_expert_plan` picks the
expert plan (forced, or the scheduler's, with its origin as a PlanSource).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from epsjax.models import ModelConfig, MoETransformer
from epsjax import sharding
from epsjax.sharding.expert_placement import ExpertPlacement
from epsjax.sharding.rules import Rules, rules_for_model
from epsjax.sharding.errors import PlanError

ParamPath = tuple


def _logical_axes(variable: nnx.Variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)


def _checked_slots(cfg: ModelConfig, mesh: Mesh, rules: Rules,
                   placement: ExpertPlacement | None) -> ExpertPlacement | None:
    ep = sharding.mesh.axis_size(mesh, rules.expert_axes)
    placement = placement or ExpertPlacement(cfg.num_experts, ep)
    if (placement.num_experts, placement.devices) != (cfg.num_experts, ep):
        raise PlanError(f"{cfg.name}: the expert placement is for {placement.num_experts} experts over "
                        f"{placement.devices} devices; the model has {cfg.num_experts} experts and rule set "
                        f"{rules.name!r} an expert-parallel size of {ep}")
    return None if placement.identity else placement


def expert_placement(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                     placement: ExpertPlacement | None = None) -> ExpertPlacement | None:
    """Where the routed experts live under a rule set: `placement` (checked against the model and mesh), else the
    contiguous layout over the EP devices; None when it is the plain [E, ...] stacking (no remapping needed)."""
    return _checked_slots(cfg, mesh, rules_for_model(cfg, mesh, rule_set), placement)


def _is_expert_param(variable) -> bool:
    logical = _logical_axes(variable)
    return bool(logical) and logical[0] == sharding.axes.EXPERTS


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state) of the model: shapes and dtypes, no values (the one nnx.eval_shape a load needs)."""
    return nnx.split(nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0))))


@dataclasses.dataclass(frozen=True, eq=False)
class ParamPlacement:
    """Where every parameter of one model goes under one rule set on one mesh, derived once (`place`) and read by
    everything that places or runs it: the checked rules table, the routed experts' slot layout (`slots`, None for
    the plain [E, ...] stacking), the abstract model and each parameter's NamedSharding. The weights (created,
    sharded or loaded through `sharding` / `layout`) and the expert compute (`ep_experts`) take the same `slots`."""

    cfg: ModelConfig
    mesh: Mesh
    rules: Rules
    slots: ExpertPlacement | None
    graphdef: nnx.GraphDef
    abstract: nnx.State
    shardings: nnx.State

    @functools.cached_property
    def _table(self) -> dict:
        return {path: v.get_value() for path, v in nnx.to_flat_state(self.shardings)}

    @functools.cached_property
    def _expert_paths(self) -> frozenset:
        return frozenset(path for path, v in nnx.to_flat_state(self.abstract) if _is_expert_param(v))

    def sharding(self, path: ParamPath) -> NamedSharding:
        """parameter path (e.g. ("layers", 0, "attn", "q_DNH")) -> its NamedSharding, for load_checkpoint."""
        if tuple(path) not in self._table:
            raise KeyError(f"{self.cfg.name} has no parameter {path}")
        return self._table[tuple(path)]

    @property
    def layout(self) -> Callable[[ParamPath, object], object] | None:
        """(parameter path, value as stored) -> the value as placed: routed-expert weights [E, ...] in slot order
        (for load_checkpoint's layout=); None when every parameter is placed as stored."""
        if self.slots is None:
            return None
        slots, expert_paths = self.slots, self._expert_paths
        return lambda path, value: slots.to_slots(value) if tuple(path) in expert_paths else value

    def elements_per_device(self) -> int:
        """Parameter elements one device holds: each parameter's shard shape under its sharding, routed experts in
        their slots (every device holds as many: each sharded dimension divides over its mesh axes). The memory
        check's parameter bytes on a mesh (epsjax.deployment.memory)."""
        total = 0
        for path, variable in nnx.to_flat_state(self.abstract):
            shape = list(variable.shape)
            if self.slots is not None and _is_expert_param(variable):
                shape[0] = self.slots.num_slots
            total += math.prod(self._table[path].shard_shape(tuple(shape)))
        return total

    def create_model(self, rngs: nnx.Rngs | int = 0) -> MoETransformer:
        """A freshly initialised model whose parameters are created directly in their shards (create_sharded_model)."""
        rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
        cfg, slots, shardings = self.cfg, self.slots, self.shardings

        @nnx.jit
        def create(rngs):
            model = MoETransformer(cfg, rngs=rngs)
            state = nnx.state(model)
            nnx.update(model, jax.lax.with_sharding_constraint(_laid_out(state, slots), shardings))
            return model

        return create(rngs)

    def shard(self, model: MoETransformer) -> MoETransformer:
        """A copy of an existing model with each parameter moved into its shards (shard_model)."""
        graphdef, state = nnx.split(model)
        state = _laid_out(state, self.slots)
        placed = jax.tree.map(lambda value, where: jax.device_put(value, where), state, self.shardings)
        return nnx.merge(graphdef, placed)

    def ep_experts(self, plan: sharding.ExpertPlan | None = None, transport: str = "auto") -> sharding.EPExperts:
        """The expert compute for weights placed here: the same mesh, rules and expert slots (plan: default the
        unpipelined ExpertPlan())."""
        return sharding.EPExperts(mesh=self.mesh, rule_set=self.rules, plan=plan or sharding.ExpertPlan(),
                                  transport=transport, placement=self.slots)


def place(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules, placement: ExpertPlacement | None = None,
          *, model_shape=None) -> ParamPlacement:
    """The ParamPlacement of a model under a rule set: rules_for_model (once), the expert slots (`placement`, checked,
    else the contiguous layout), the abstract model (`model_shape`: abstract_model(cfg) when the caller has it) and
    every parameter's sharding, checking that each sharded dimension divides by its mesh axes (naming the parameter
    if not). Routed-expert weights are checked (and later stored) in slot order."""
    rules = rules_for_model(cfg, mesh, rule_set)
    slots = _checked_slots(cfg, mesh, rules, placement)
    graphdef, abstract = model_shape if model_shape is not None else abstract_model(cfg)

    def sharding_of(path, variable):
        logical = _logical_axes(variable)
        spec = rules.spec(logical)
        shape = list(variable.shape)
        if slots is not None and _is_expert_param(variable):
            shape[0] = slots.num_slots
        for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
            names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            parts = math.prod(mesh.shape[a] for a in names)
            if size % parts:
                where = "/".join(str(p) for p in path)
                raise PlanError(f"{cfg.name}: parameter {where} {tuple(variable.shape)} dimension {dim} "
                                 f"({logical[dim]}={size}) does not divide over mesh axes {names} ({parts} "
                                 f"devices) of rule set {rules.name!r}")
        return variable.replace(NamedSharding(mesh, spec))

    return ParamPlacement(cfg, mesh, rules, slots, graphdef, abstract, nnx.map_state(sharding_of, abstract))


def abstract_shardings(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                       placement: ExpertPlacement | None = None):
    """(graphdef, abstract state, state of NamedShardings) of the model under a rule set (`place`)."""
    p = place(cfg, mesh, rule_set, placement)
    return p.graphdef, p.abstract, p.shardings


def param_shardings(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                    placement: ExpertPlacement | None = None) -> Callable[[ParamPath], NamedSharding]:
    """parameter path (e.g. ("layers", 0, "attn", "q_DNH")) -> its NamedSharding, for load_checkpoint."""
    return place(cfg, mesh, rule_set, placement).sharding


def param_layout(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                 placement: ExpertPlacement | None = None) -> Callable[[ParamPath, object], object] | None:
    """(parameter path, value as stored) -> the value as placed: routed-expert weights [E, ...] in the slot order
    of `expert_placement` (for load_checkpoint's layout=); None when every parameter is placed as stored."""
    return place(cfg, mesh, rule_set, placement).layout


def _laid_out(state, slots: ExpertPlacement | None):
    """The state with its routed-expert weights in slot order."""
    if slots is None:
        return state
    return nnx.map_state(lambda path, v: v.replace(slots.to_slots(v.get_value())) if _is_expert_param(v) else v,
                         state)


def create_sharded_model(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                         rngs: nnx.Rngs | int = 0, placement: ExpertPlacement | None = None) -> MoETransformer:
    """A freshly initialised model whose parameters are created directly in their shards.

    Equal, parameter for parameter, to MoETransformer(cfg, rngs=rngs) built on one device from the same rngs
    (routed-expert weights in the slot order of `expert_placement` when it is not the plain stacking).
    """
    return place(cfg, mesh, rule_set, placement).create_model(rngs)


def shard_model(model: MoETransformer, mesh: Mesh, rule_set: str | Rules,
                placement: ExpertPlacement | None = None) -> MoETransformer:
    """A copy of an existing model with each parameter moved into its shards (one parameter at a time), routed
    experts in the slot order of `expert_placement`."""
    return place(model.cfg, mesh, rule_set, placement).shard(model)


def default_mesh_shape(rule_set: str, cfg: ModelConfig, devices: int) -> dict[str, int]:
    """The mesh a rule set uses on `devices` devices: as much TP / EP as the model's heads and experts allow,
    data parallelism for the rest."""
    def largest_divisor(n: int, fits) -> int:
        return max(d for d in range(1, n + 1) if n % d == 0 and fits(d))

    tp = largest_divisor(devices, lambda t: cfg.num_heads % t == 0)
    if rule_set == "tp":
        return dict(data=devices // tp, tensor=tp)
    if rule_set == "dp":
        return dict(data=devices)
    ep = largest_divisor(devices, lambda d: cfg.num_experts % d == 0)
    if rule_set == "dp_ep":
        return dict(data=devices // ep, expert=ep)
    if rule_set == "tp_ep":
        tensor = largest_divisor(ep, lambda t: cfg.num_heads % t == 0)
        return dict(data=devices // ep, tensor=tensor, expert=ep // tensor)
    raise PlanError(f"unknown rule set {rule_set!r}; choose from tp, dp, tp_ep, dp_ep")


class PlanSource(enum.Enum):
    """Where an expert plan came from."""

    FORCED = "forced"                      # given by the caller (epsjax generate --pipeline-degree)
    SCHEDULER = "scheduler"                # the scheduler's search for this model, mesh and batch
    NO_COST_MODEL = "no cost model"        # the device kind has no cost model: the unpipelined default
    UNEVEN_PLACEMENT = "uneven placement"  # the scheduler does not model uneven placements: the unpipelined default


@dataclasses.dataclass(frozen=True)
class ExpertPlanChoice:
    """An expert plan and its origin. With source SCHEDULER: `prefill` holds the one search (its PlanChoice), the
    whole prefill it predicts and the cost model both used."""

    plan: sharding.ExpertPlan
    source: PlanSource
    prefill: object = None  # scheduler.PrefillPlan
    device_kind: str = ""

    @property
    def predicted_prefill_s(self) -> float | None:
        return None if self.prefill is None else self.prefill.prefill_s

    def describe(self) -> str:
        """One phrase: "forced", or what the scheduler did."""
        if self.source is PlanSource.FORCED:
            return "forced"
        if self.source is PlanSource.UNEVEN_PLACEMENT:
            return "scheduler: does not model uneven expert placements yet, unpipelined default"
        if self.source is PlanSource.NO_COST_MODEL:
            return f"scheduler: no cost model for {self.device_kind!r}, unpipelined default"
        c = self.prefill.choice
        return (f"scheduler: predicted {c.predicted_s * 1e3:.2f} ms vs {c.unpipelined_s * 1e3:.2f} ms unpipelined, "
                f"searched in {c.search_seconds * 1e3:.0f} ms")


def choose_expert_plan(cfg: ModelConfig, mesh: Mesh, rules: Rules, slots: ExpertPlacement | None, *, batch: int,
                       seq_len: int, plan: sharding.ExpertPlan | None = None, hardware=None) -> ExpertPlanChoice:
    """The expert plan for a prefill of `batch` x `seq_len` tokens on `mesh` under checked `rules` with expert
    `slots` (a ParamPlacement's): `plan` when forced, else the scheduler's (epsjax.scheduler.plan_prefill: pipeline
    degree, split, backend and tiling per stage for this model, mesh, load and hardware; one search)."""
    from epsjax import scheduler

    kind = mesh.devices.flat[0].device_kind
    if plan is not None:
        return ExpertPlanChoice(plan, PlanSource.FORCED, device_kind=kind)
    if slots is not None:  # the scheduler's cost model assumes E / P experts on every device
        return ExpertPlanChoice(sharding.ExpertPlan(), PlanSource.UNEVEN_PLACEMENT, device_kind=kind)
    prefill = scheduler.plan_prefill(cfg, dict(mesh.shape), batch, seq_len, hardware, rule_set=rules.name)
    if prefill is None:
        return ExpertPlanChoice(sharding.ExpertPlan(), PlanSource.NO_COST_MODEL, device_kind=kind)
    return ExpertPlanChoice(prefill.choice.plan.to_expert_plan(), PlanSource.SCHEDULER, prefill, kind)


def ep_experts(cfg: ModelConfig, mesh: Mesh, rule_set: str, *, batch: int, seq_len: int,
               plan: sharding.ExpertPlan | None = None, transport: str = "auto",
               hardware=None) -> tuple[sharding.EPExperts, str]:
    """The expert compute for a prefill of `batch` x `seq_len` tokens on `mesh`, and where its plan came from
    (ExpertPlanChoice.describe).

    By default the plan is the scheduler's (choose_expert_plan); `plan` forces one.
    """
    rules = rules_for_model(cfg, mesh, rule_set)
    slots = _checked_slots(cfg, mesh, rules, None)
    choice = choose_expert_plan(cfg, mesh, rules, slots, batch=batch, seq_len=seq_len, plan=plan, hardware=hardware)
    return sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=choice.plan, transport=transport,
                              placement=slots), choice.describe()
