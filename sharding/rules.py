"""One table per parallel strategy: logical axis names (sharding/axes.py) -> mesh axes (sharding/mesh.py).

    logical axis   tp            dp                    tp_ep                 dp_ep
    ------------   -----------   -------------------   -------------------   -------------------
    batch          data,expert   data,expert,tensor    data,expert           data,expert,tensor
    moe_tokens     data,expert   data,expert,tensor    data,expert,tensor    data,expert,tensor
    vocab          tensor        -                     tensor                -
    heads          tensor        -                     tensor                -
    kv_heads       tensor*       -                     tensor*               -
    mlp            tensor        -                     tensor                -
    experts        -             -                     expert,tensor         expert,tensor
    expert_mlp     tensor        -                     -                     -
    embed, head_dim, q_lora, kv_lora, norm: replicated everywhere.

    * replicated instead when num_kv_heads is not divisible by the tensor size (GQA with few KV heads).

- "tp": Megatron tensor parallelism for attention and every FFN; each expert's FFN dim is split over "tensor"
  (the MoE output is a partial sum, reduced with psum). The TP+TP baseline.
- "dp": every weight replicated, the batch split over every axis. The DP baseline.
- "tp_ep": EPS-MoE's Mixtral/DBRX strategy: attention TP over "tensor" ("expert" adds data parallelism to
  attention), the MoE expert-parallel over all of ("expert", "tensor"); inside the MoE the tokens that TP
  attention replicates over "tensor" are split over it, so every EP rank routes different tokens.
- "dp_ep": EPS-MoE's DeepSeek-V2 strategy: attention data parallel over every axis, the MoE expert-parallel over
  ("expert", "tensor").

A mesh axis of size 1 costs nothing, so one mesh shape serves every table; e.g. on 8 devices tp_ep with
make_mesh(tensor=2, expert=4) runs attention TP=2 x DP=4 and the MoE with EP=8.
"""

from __future__ import annotations

import dataclasses
import math

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epsjax.sharding import axes
from epsjax.sharding.mesh import AXES, DATA, EXPERT, TENSOR
from epsjax.sharding.errors import PlanError

MeshAxes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """A logical -> mesh axes table. Every logical name of sharding/axes.py has an entry (() = replicated)."""

    name: str
    table: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self):
        names = [logical for logical, _ in self.table]
        known = set(axes.PARAM_AXES) | set(axes.ACTIVATION_AXES)
        unknown = sorted(set(names) - known)
        if unknown:
            raise PlanError(f"rule set {self.name!r}: unknown logical axes {unknown}; known: {sorted(known)}")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise PlanError(f"rule set {self.name!r}: logical axes {duplicated} have more than one entry")
        missing = sorted(known - set(names))
        if missing:
            raise PlanError(f"rule set {self.name!r}: no entry for logical axes {missing} (use () to replicate)")
        for logical, mesh_axes in self.table:
            if not isinstance(mesh_axes, tuple) or len(set(mesh_axes)) != len(mesh_axes):
                raise PlanError(f"rule set {self.name!r}: {logical!r} must map to a tuple of distinct mesh axes, "
                                 f"got {mesh_axes!r}")

    @classmethod
    def from_dict(cls, name: str, table: dict[str, MeshAxes | str | None]) -> "Rules":
        def as_tuple(v):
            return () if v is None else (v,) if isinstance(v, str) else tuple(v)
        return cls(name, tuple((k, as_tuple(v)) for k, v in table.items()))

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        for name, mesh_axes in self.table:
            if name == logical:
                return mesh_axes
        raise PlanError(f"rule set {self.name!r} has no entry for logical axis {logical!r}")

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        """The PartitionSpec of an array annotated with logical axis names (one per dimension)."""
        return PartitionSpec(*(self.mesh_axes(a) or None for a in logical_axes))

    def flax_rules(self) -> tuple[tuple[str, MeshAxes | None], ...]:
        """The table in the form of flax's `nnx.logical_axis_rules` (for models created under `jax.set_mesh`)."""
        return tuple((logical, mesh_axes or None) for logical, mesh_axes in self.table)

    def replace(self, **changes: MeshAxes) -> "Rules":
        """A copy with some logical axes remapped, e.g. rules.replace(kv_heads=())."""
        table = dict(self.table)
        for logical, mesh_axes in changes.items():
            if logical not in table:
                raise PlanError(f"rule set {self.name!r} has no logical axis {logical!r}")
            table[logical] = tuple(mesh_axes)
        return Rules(self.name, tuple(table.items()))

    # The axes the expert compute reads.
    @property
    def expert_axes(self) -> MeshAxes:
        """Expert parallelism: the mesh axes the experts are split over (their all-to-all group)."""
        return self.mesh_axes(axes.EXPERTS)

    @property
    def expert_tensor_axes(self) -> MeshAxes:
        """Tensor parallelism inside each expert: the mesh axes its FFN dim is split over."""
        return self.mesh_axes(axes.EXPERT_MLP)

    @property
    def moe_token_axes(self) -> MeshAxes:
        return self.mesh_axes(axes.MOE_TOKENS)

    @property
    def batch_axes(self) -> MeshAxes:
        return self.mesh_axes(axes.BATCH)


def _table(name: str, **entries: MeshAxes) -> Rules:
    replicated = {logical: () for logical in axes.PARAM_AXES + axes.ACTIVATION_AXES}
    return Rules(name, tuple({**replicated, **entries}.items()))


_TP_ATTENTION = dict(vocab=(TENSOR,), heads=(TENSOR,), kv_heads=(TENSOR,), mlp=(TENSOR,),
                     act_heads=(TENSOR,), act_kv_heads=(TENSOR,))

RULE_SETS: dict[str, Rules] = {
    "tp": _table("tp", batch=(DATA, EXPERT), moe_tokens=(DATA, EXPERT), expert_mlp=(TENSOR,), **_TP_ATTENTION),
    "dp": _table("dp", batch=(DATA, EXPERT, TENSOR), moe_tokens=(DATA, EXPERT, TENSOR)),
    "tp_ep": _table("tp_ep", batch=(DATA, EXPERT), moe_tokens=(DATA, EXPERT, TENSOR), experts=(EXPERT, TENSOR),
                    act_experts=(EXPERT, TENSOR), **_TP_ATTENTION),
    "dp_ep": _table("dp_ep", batch=(DATA, EXPERT, TENSOR), moe_tokens=(DATA, EXPERT, TENSOR),
                    experts=(EXPERT, TENSOR), act_experts=(EXPERT, TENSOR)),
}


def get_rules(rule_set: str | Rules) -> Rules:
    if isinstance(rule_set, Rules):
        return rule_set
    if rule_set not in RULE_SETS:
        raise PlanError(f"unknown rule set {rule_set!r}; known: {', '.join(RULE_SETS)}")
    return RULE_SETS[rule_set]


def _size(mesh: Mesh, mesh_axes: MeshAxes) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes)


def _describe(mesh: Mesh, mesh_axes: MeshAxes) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)


def check_mesh(rules: Rules, mesh: Mesh) -> None:
    """Every mesh axis the table names exists in the mesh; the MoE's axes are consistent."""
    for logical, mesh_axes in rules.table:
        absent = [a for a in mesh_axes if a not in mesh.shape]
        if absent:
            raise PlanError(f"rule set {rules.name!r} maps {logical!r} to mesh axes {absent} that the mesh "
                             f"{dict(mesh.shape)} lacks (build it with sharding.make_mesh: axes {AXES})")
    overlap = sorted(set(rules.expert_tensor_axes) & set(rules.moe_token_axes))
    if overlap:
        raise PlanError(f"rule set {rules.name!r}: mesh axes {overlap} split both the experts' FFN dim "
                         f"(expert_mlp) and the MoE's tokens (moe_tokens); an expert-TP axis must see all tokens")
    overlap = sorted(set(rules.expert_tensor_axes) & set(rules.expert_axes))
    if overlap:
        raise PlanError(f"rule set {rules.name!r}: mesh axes {overlap} split both the experts and their FFN dim")


def rules_for_model(cfg, mesh: Mesh, rule_set: str | Rules) -> Rules:
    """The table for one model on one mesh, after the checks that name the model's numbers.

    Errors: fewer experts than the expert-parallel size (any other count is placed: sharding.expert_placement),
    heads not divisible by the tensor size, a mesh axis the table names but the mesh lacks. KV heads that do not
    divide by the tensor size are replicated (GQA models with fewer KV heads than TP ranks). Divisibility of every
    other parameter is checked by epsjax.placement when the shardings are made.
    """
    rules = get_rules(rule_set)
    check_mesh(rules, mesh)
    ep_axes = rules.expert_axes
    ep = _size(mesh, ep_axes)
    if cfg.num_experts < ep:
        raise PlanError(f"{cfg.name}: num_experts={cfg.num_experts} is fewer than the expert-parallel size {ep} "
                         f"({rules.name}: experts -> {_describe(mesh, ep_axes)}); every device needs an expert")
    heads_axes = rules.mesh_axes(axes.HEADS)
    tp = _size(mesh, heads_axes)
    if cfg.num_heads % tp:
        raise PlanError(f"{cfg.name}: num_heads={cfg.num_heads} is not divisible by the tensor-parallel size {tp} "
                         f"({rules.name}: heads -> {_describe(mesh, heads_axes)})")
    kv_axes = rules.mesh_axes(axes.KV_HEADS)
    if cfg.mla is None and cfg.num_kv_heads % _size(mesh, kv_axes):
        rules = rules.replace(kv_heads=(), act_kv_heads=())
    return rules


def batch_sharding(mesh: Mesh, rule_set: str | Rules) -> NamedSharding:
    """Where [B, ...] inputs go (Engine(batch_sharding=...)): the batch split over the rule set's batch axes.
    B must divide by their size."""
    axes = get_rules(rule_set).batch_axes
    return NamedSharding(mesh, PartitionSpec(axes or None))
