"""Parameters in their shards: creation and checkpoint placement for one rule set of sharding/.

`create_sharded_model` builds the model inside one jit whose outputs are constrained to the rule set's
shardings, so XLA generates each device's shard of each parameter on that device (jax's threefry is
partitionable: the values equal an unsharded model's from the same rngs). No parameter exists whole on one
device. `param_shardings` gives `epsjax.checkpoint.load_checkpoint` the same placement per parameter path.
"""

from __future__ import annotations

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


def expert_placement(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                     placement: ExpertPlacement | None = None) -> ExpertPlacement | None:
    """Where the routed experts live under a rule set: `placement` (checked against the model and mesh), else the
    contiguous layout over the EP devices; None when it is the plain [E, ...] stacking (no remapping needed)."""
    rules = rules_for_model(cfg, mesh, rule_set)
    ep = sharding.mesh.axis_size(mesh, rules.expert_axes)
    placement = placement or ExpertPlacement(cfg.num_experts, ep)
    if (placement.num_experts, placement.devices) != (cfg.num_experts, ep):
        raise PlanError(f"{cfg.name}: the expert placement is for {placement.num_experts} experts over "
                        f"{placement.devices} devices; the model has {cfg.num_experts} experts and rule set "
                        f"{rules.name!r} an expert-parallel size of {ep}")
    return None if placement.identity else placement


def _is_expert_param(variable) -> bool:
    logical = _logical_axes(variable)
    return bool(logical) and logical[0] == sharding.axes.EXPERTS


def abstract_shardings(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                       placement: ExpertPlacement | None = None):
    """(graphdef, abstract state, state of NamedShardings) of the model under a rule set; checks that every
    sharded dimension of every parameter divides by its mesh axes, naming the parameter if not. Routed-expert
    weights are checked (and later stored) in the slot order of `expert_placement`."""
    rules = rules_for_model(cfg, mesh, rule_set)
    slots = expert_placement(cfg, mesh, rule_set, placement)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0))))

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

    shardings = nnx.map_state(sharding_of, abstract)
    return graphdef, abstract, shardings


def param_shardings(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                    placement: ExpertPlacement | None = None) -> Callable[[ParamPath], NamedSharding]:
    """parameter path (e.g. ("layers", 0, "attn", "q_DNH")) -> its NamedSharding, for load_checkpoint."""
    _, _, shardings = abstract_shardings(cfg, mesh, rule_set, placement)
    table = {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}

    def sharding(path: ParamPath) -> NamedSharding:
        if tuple(path) not in table:
            raise KeyError(f"{cfg.name} has no parameter {path}")
        return table[tuple(path)]

    return sharding


def param_layout(cfg: ModelConfig, mesh: Mesh, rule_set: str | Rules,
                 placement: ExpertPlacement | None = None) -> Callable[[ParamPath, object], object] | None:
    """(parameter path, value as stored) -> the value as placed: routed-expert weights [E, ...] in the slot order
    of `expert_placement` (for load_checkpoint's layout=); None when every parameter is placed as stored."""
    slots = expert_placement(cfg, mesh, rule_set, placement)
    if slots is None:
        return None
    _, abstract, _ = abstract_shardings(cfg, mesh, rule_set, placement)
    expert_paths = {path for path, v in nnx.to_flat_state(abstract) if _is_expert_param(v)}
    return lambda path, value: slots.to_slots(value) if tuple(path) in expert_paths else value


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
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    _, _, shardings = abstract_shardings(cfg, mesh, rule_set, placement)
    slots = expert_placement(cfg, mesh, rule_set, placement)

    @nnx.jit
    def create(rngs):
        model = MoETransformer(cfg, rngs=rngs)
        state = nnx.state(model)
        nnx.update(model, jax.lax.with_sharding_constraint(_laid_out(state, slots), shardings))
        return model

    return create(rngs)


def shard_model(model: MoETransformer, mesh: Mesh, rule_set: str | Rules,
                placement: ExpertPlacement | None = None) -> MoETransformer:
    """A copy of an existing model with each parameter moved into its shards (one parameter at a time), routed
    experts in the slot order of `expert_placement`."""
    _, _, shardings = abstract_shardings(model.cfg, mesh, rule_set, placement)
    graphdef, state = nnx.split(model)
    state = _laid_out(state, expert_placement(model.cfg, mesh, rule_set, placement))
    placed = jax.tree.map(lambda value, where: jax.device_put(value, where), state, shardings)
    return nnx.merge(graphdef, placed)


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


def ep_experts(cfg: ModelConfig, mesh: Mesh, rule_set: str, *, batch: int, seq_len: int,
               plan: sharding.ExpertPlan | None = None, transport: str = "auto",
               hardware=None) -> tuple[sharding.EPExperts, str]:
    """The expert compute for a prefill of `batch` x `seq_len` tokens on `mesh`, and where its plan came from.

    By default the plan is the scheduler's (epsjax.scheduler.plan_for: pipeline degree, split, backend and tiling
    per stage for this model, mesh, load and hardware); `plan` forces one.
    """
    from epsjax import scheduler

    slots = expert_placement(cfg, mesh, rule_set)
    if plan is not None:
        return sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport=transport,
                                  placement=slots), "forced"
    if slots is not None:  # the scheduler's cost model assumes E / P experts on every device
        return sharding.EPExperts(mesh=mesh, rule_set=rule_set, transport=transport, placement=slots), (
            "scheduler: does not model uneven expert placements yet, unpipelined default")
    choice = scheduler.search_for(cfg, dict(mesh.shape), batch, seq_len, rule_set=rule_set, hardware=hardware)
    if choice is None:
        source = f"scheduler: no cost model for {mesh.devices.flat[0].device_kind!r}, unpipelined default"
        plan = sharding.ExpertPlan()
    else:
        source = (f"scheduler: predicted {choice.predicted_s * 1e3:.2f} ms vs {choice.unpipelined_s * 1e3:.2f} ms "
                  f"unpipelined, searched in {choice.search_seconds * 1e3:.0f} ms")
        plan = choice.plan.to_expert_plan()
    return sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport=transport, placement=slots), source
