"""A checkpoint read straight onto the two DEP groups: no device ever holds more than its share.

    model = load_placed(path, groups)                    # parameters already where DEPRuntime keeps them
    runtime = DEPRuntime.from_checkpoint(path, groups)   # the same, then the runtime around it

epsjax.checkpoint.load_checkpoint streams one tensor rule at a time from the memory-mapped safetensors files (each
checked for shape, dtype and finiteness) and puts every parameter where `shardings` says before reading the next.
Here that is the parameter's group:

    routed experts [E, ...]   laid out in slot order on the host (`expert_slots`, numpy: never on a device whole),
                              then put with the expert mesh's P("expert") sharding: expert device e receives its
                              own slots' rows, [slots, ...], and nothing else
    everything else           put replicated over the attention mesh (attention is data parallel): no expert device
                              receives an attention-side weight

So each device's parameter bytes are its share from the start: an expert device holds slots / (eg * slots) of every
MoE layer's expert weights, an attention device the attention-side parameters. The host holds one tensor rule at a
time (one layer's stacked expert weight, as the checkpoint stores it).
"""

from __future__ import annotations

import os

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from epsjax.checkpoint import CheckpointError, load_checkpoint, read_config
from epsjax.dep.groups import DEPGroups
from epsjax.models import MoETransformer
from epsjax.models.quantize import EXPERT_WEIGHTS
from epsjax.sharding import EXPERT


def is_routed_expert(path: tuple) -> bool:
    """Whether a parameter path names a routed-expert weight ([E, ...], one slice per expert)."""
    return path[-1] in EXPERT_WEIGHTS


def expert_slots(w_E__: np.ndarray, groups: DEPGroups) -> np.ndarray:
    """Stacked expert weights [E, ...] -> slot order [eg * slots, ...] on the host, empty slots zero."""
    table = groups.placement.expert_of_slot()
    out = np.zeros((len(table),) + w_E__.shape[1:], w_E__.dtype)
    out[table >= 0] = w_E__[table[table >= 0]]
    return out


def group_shardings(groups: DEPGroups):
    """(parameter path -> sharding, (path, value) -> value as placed) for load_checkpoint: routed experts in slot
    order split over the expert mesh, everything else replicated over the attention mesh."""
    experts = NamedSharding(groups.expert_mesh, P(EXPERT))
    attention = NamedSharding(groups.attention_mesh, P())

    def sharding(path):
        return experts if is_routed_expert(path) else attention

    def layout(path, value):
        return expert_slots(np.asarray(value), groups) if is_routed_expert(path) else value

    return sharding, layout


def load_placed(path: str | os.PathLike, groups: DEPGroups, *, dtype: str | None = None, progress: bool = False,
                allow_nonfinite: bool = False) -> MoETransformer:
    """The checkpoint's model with every parameter on its group (module docstring): its routed-expert weights are
    [eg * slots, ...] in slot order, as DEPRuntime keeps them."""
    cfg = read_config(path, dtype=dtype)
    if groups.placement.num_experts != cfg.num_experts:
        raise CheckpointError(f"{path}: the model has {cfg.num_experts} experts, the DEP groups place "
                              f"{groups.placement.num_experts}")
    sharding, layout = group_shardings(groups)
    return load_checkpoint(path, dtype=dtype, shardings=sharding, layout=layout, progress=progress,
                           allow_nonfinite=allow_nonfinite)
