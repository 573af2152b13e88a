"""Device meshes with the named axes the rules tables speak: ("data", "tensor", "expert").

One process sees all its local devices; many processes (jax.distributed) see the global devices, and the same
`make_mesh` call on every process builds the same global mesh. Axes are `AxisType.Auto`: outside shard_map, XLA's
partitioner propagates the parameters' shardings through the model; inside the MoE's shard_map every axis is
manual.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh
from epsjax.sharding.errors import PlanError

DATA = "data"
TENSOR = "tensor"
EXPERT = "expert"
AXES = (DATA, TENSOR, EXPERT)


def make_mesh(data: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor, expert) mesh over the first data*tensor*expert of `devices` (default: jax.devices()).

    Raises PlanError for non-positive sizes and for a mesh larger than the devices there are.
    """
    sizes = {DATA: data, TENSOR: tensor, EXPERT: expert}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise PlanError(f"mesh axis {name!r} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax"
                if platform == "cpu" else "")
        raise PlanError(f"mesh data={data} x tensor={tensor} x expert={expert} needs {needed} devices, but only "
                         f"{len(devices)} {platform} device(s) are available{hint}")
    return jax.make_mesh((data, tensor, expert), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:needed])


def axis_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    """The number of devices spanned by `axes` (1 for none)."""
    return math.prod(mesh.shape[a] for a in axes)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           *, local_device_count: int | None = None) -> None:
    """Joins a multi-process run (one call per process, before any other jax call).

    CPU processes exchange collectives through gloo (jax_cpu_collectives_implementation); local_device_count
    sets the number of CPU devices of this process (jax_num_cpu_devices), e.g. 4 each for 2 x 4 devices.
    """
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
