"""Moving experts into the device pool: `DeviceTransfers` for the runtime, `InstantTransfers` for trace simulation.

The device pool is three arrays, w_gate [S, D, F], w_up [S, D, F], w_down [S, F, D], one row per slot: the layout
pallas_kernels.expert_ffn reads through `slot_of_expert`. A transfer is two steps:

1. start: jax.device_put of the expert's three host arrays into fresh device buffers (staging). From a jax host
   memory space ("pinned_host") this returns at once and the copy runs asynchronously (on a GPU: a DMA on a copy
   stream, beside the compute stream; on CPU: a memcpy on a runtime thread).
2. install: a jitted, donated dynamic_update_slice writes the staged expert into its pool slot in place. It is only
   dispatched once the copy is ready (or when a layer needs the expert now): dispatched earlier it would make the
   compute stream wait for the copy.

A staging buffer lives until its install has run; `staging_count` reports the live ones for the cache's budget.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from epsjax.offload.store import ExpertStore, Key, device_memory_kind


@functools.partial(jax.jit, donate_argnums=(0, 1, 2), keep_unused=True)
def _install(pool_g_SDF, pool_u_SDF, pool_d_SFD, g_DF, u_DF, d_FD, slot, fence):
    del fence  # an input only, so the install waits for the last grouped FFN that read the pool
    put = lambda pool, w: jax.lax.dynamic_update_index_in_dim(pool, w.astype(pool.dtype), slot, axis=0)
    return put(pool_g_SDF, g_DF), put(pool_u_SDF, u_DF), put(pool_d_SFD, d_FD), slot


class DeviceTransfers:
    """The device expert pool and the host -> device copies into it.

    initial: optional (w_gate [S, D, F], w_up, w_down) host arrays to create the pool from (the all-on-device
    mode); otherwise the pool starts zeroed.
    """

    def __init__(self, store: ExpertStore, num_slots: int, *, initial=None):
        self.store = store
        self.num_slots = num_slots
        sharding = SingleDeviceSharding(store.device, memory_kind=device_memory_kind(store.device))
        S, D, F, dt = num_slots, store.d_model, store.ffn_dim, store.dtype
        if initial is None:
            zeros = jax.jit(lambda: tuple(jnp.zeros(s, dt) for s in ((S, D, F), (S, D, F), (S, F, D))),
                            out_shardings=sharding)
            self.pool = zeros()
        else:
            self.pool = tuple(jax.device_put(np.asarray(w), sharding) for w in initial)
        self._staged: dict[Key, tuple] = {}
        self._installing: list[jax.Array] = []  # per install: a scalar that is ready once the install has run
        self.fence = None  # the runtime sets it to the latest output computed from the pool
        self.copy_seconds = 0.0  # host time spent issuing device_put (all of the copy when it is synchronous)

    @property
    def pool_bytes(self) -> int:
        return sum(int(w.nbytes) for w in self.pool)

    def start(self, key: Key, slot: int) -> None:
        del slot
        t0 = time.perf_counter()
        self._staged[key] = self.store.fetch(key)
        self.copy_seconds += time.perf_counter() - t0

    def ready(self, key: Key) -> bool:
        return all(a.is_ready() for a in self._staged[key])

    def wait(self, key: Key) -> None:
        jax.block_until_ready(self._staged[key])

    def install(self, key: Key, slot: int) -> None:
        g, u, d = self._staged.pop(key)
        *pool, done = _install(*self.pool, g, u, d, np.int32(slot), self.fence)
        self.pool = tuple(pool)
        self._installing.append(done)

    def staging_count(self) -> int:
        self._installing = [d for d in self._installing if not d.is_ready()]
        return len(self._staged) + len(self._installing)

    def wait_staging(self) -> None:
        """Blocks until the oldest install has run (freeing its staging buffer)."""
        if self._installing:
            self._installing[0].block_until_ready()


class InstantTransfers:
    """No bytes move: every transfer is ready at once (replaying routing traces through the cache engine)."""

    pool = None

    def start(self, key: Key, slot: int) -> None:
        pass

    def ready(self, key: Key) -> bool:
        return True

    def wait(self, key: Key) -> None:
        pass

    def install(self, key: Key, slot: int) -> None:
        pass

    def staging_count(self) -> int:
        return 0

    def wait_staging(self) -> None:
        pass
