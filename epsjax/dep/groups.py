"""The two device groups of disaggregated expert parallelism and where the routed experts live.

    groups = DEPGroups.split(attention=3, experts=5, num_experts=16)   # any split of the devices
    groups.attention_mesh   # sharding.make_mesh(data=3) over the first 3 devices: attention is data parallel
    groups.expert_mesh      # sharding.make_mesh(expert=5) over the next 5: the routed experts, expert parallel

Expert placement (sharding.ExpertPlacement, the EP layer's too): expert device e owns the contiguous experts
[bounds[e], bounds[e + 1]) with bounds[e] = e * E // eg, so blocks differ in size by at most one and any eg <= E
works (16 experts over 5 devices: 3, 3, 3, 3, 4). Each device stores `slots = ceil(E / eg)` expert slots, its own
experts first and zero weights in the rest (never routed to), so the stacked weights [eg * slots, D, F] shard
evenly over the expert mesh's "expert" axis whether E divides eg or not.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh

from epsjax import sharding
from epsjax.scheduler.errors import ScheduleError
from epsjax.sharding.expert_placement import ExpertPlacement


def expert_bounds(num_experts: int, devices: int) -> tuple[int, ...]:
    """Expert device e owns experts [bounds[e], bounds[e + 1]) (module docstring)."""
    if devices < 1 or num_experts < devices:
        raise ScheduleError(f"{num_experts} experts cannot be spread over {devices} expert devices (need E >= eg >= 1)")
    return tuple(e * num_experts // devices for e in range(devices + 1))


@dataclasses.dataclass(frozen=True)
class DEPGroups:
    attention_mesh: Mesh
    expert_mesh: Mesh
    placement: ExpertPlacement

    def __post_init__(self):
        shared = set(self.attention_devices) & set(self.expert_devices)
        if shared:
            raise ScheduleError(f"devices {sorted(d.id for d in shared)} are in both groups")

    @classmethod
    def split(cls, attention: int, experts: int, num_experts: int,
              devices: Sequence[jax.Device] | None = None) -> "DEPGroups":
        """The first `attention` devices (of `devices`, default jax.devices()) form the attention group, the next
        `experts` the expert group."""
        devices = list(jax.devices() if devices is None else devices)
        if attention < 1 or experts < 1:
            raise ScheduleError(f"both groups need at least one device, got attention={attention} experts={experts}")
        if attention + experts > len(devices):
            raise ScheduleError(f"attention={attention} + experts={experts} devices, but only {len(devices)} exist")
        return cls(sharding.make_mesh(data=attention, devices=devices[:attention]),
                   sharding.make_mesh(expert=experts, devices=devices[attention:attention + experts]),
                   ExpertPlacement(num_experts, experts))

    @property
    def attention_devices(self) -> tuple[jax.Device, ...]:
        """Attention device a is the a-th shard of [B, ...] arrays over the attention mesh's "data" axis."""
        return tuple(self.attention_mesh.devices.flat)

    @property
    def expert_devices(self) -> tuple[jax.Device, ...]:
        """Expert device e holds global expert slots [e * slots, (e + 1) * slots)."""
        return tuple(self.expert_mesh.devices.flat)

    @property
    def ag(self) -> int:
        return len(self.attention_devices)

    @property
    def eg(self) -> int:
        return len(self.expert_devices)

    def describe(self) -> str:
        owned = ", ".join(map(str, self.placement.experts_per_device()))
        return (f"attention group {[d.id for d in self.attention_devices]} (data parallel), expert group "
                f"{[d.id for d in self.expert_devices]} (experts per device: {owned}; {self.placement.slots} slots)")
