"""The host expert store: every routed expert's weights in host memory, one (MoE layer, expert) at a time.

Keys are (layer, expert) with `layer` the index among the model's MoE layers (cfg.moe_layers), not the decoder
layer number. An expert is three matrices: w_gate [D, F], w_up [D, F], w_down [F, D].

Where the platform exposes one, the weights live in the device's "pinned_host" memory space: page-locked host
memory that the device's DMA engine reads directly, so `jax.device_put` to the device returns at once and the copy
runs beside computation. jax 0.11.2 exposes the kinds ("device", "pinned_host", "unpinned_host") on CPU as well;
without them the store falls back to "unpinned_host", then to numpy arrays (a synchronous copy per transfer).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from epsjax.offload.errors import OffloadError

Key = tuple[int, int]  # (MoE layer index, expert id)

HOST_KINDS = ("pinned_host", "unpinned_host")


def memory_kinds(device: jax.Device) -> list[str]:
    """The memory spaces a device addresses, e.g. ['device', 'pinned_host', 'unpinned_host']."""
    try:
        return [m.kind for m in device.addressable_memories()]
    except Exception:  # a backend without memory spaces
        return []


def host_memory_kind(device: jax.Device, requested: str = "auto") -> str | None:
    """The host memory kind experts are stored in: "pinned_host" when the device has it, else "unpinned_host",
    else None (plain numpy). A requested kind the device lacks raises OffloadError."""
    kinds = memory_kinds(device)
    if requested == "numpy":
        return None
    if requested != "auto":
        if requested not in kinds:
            raise OffloadError(f"device {device} has no memory kind {requested!r}; it has {kinds}")
        return requested
    return next((k for k in HOST_KINDS if k in kinds), None)


def device_memory_kind(device: jax.Device) -> str | None:
    return "device" if "device" in memory_kinds(device) else None


class ExpertStore:
    """Expert weights on the host, fetched to the device one expert at a time.

    weights: per MoE layer, (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]) host arrays (numpy or jax).
    memory_kind: "auto" (pinned_host where available), "pinned_host", "unpinned_host" or "numpy".
    """

    def __init__(self, weights, *, device: jax.Device | None = None, memory_kind: str = "auto"):
        if not weights:
            raise OffloadError("an expert store needs at least one MoE layer")
        self.device = device or jax.devices()[0]
        self.memory_kind = host_memory_kind(self.device, memory_kind)
        kind = device_memory_kind(self.device)
        self._device_sharding = SingleDeviceSharding(self.device, memory_kind=kind)
        host = None if self.memory_kind is None else SingleDeviceSharding(self.device, memory_kind=self.memory_kind)
        first = np.asarray(weights[0][0])
        self.num_layers = len(weights)
        self.num_experts, self.d_model, self.ffn_dim = first.shape
        self.dtype = first.dtype
        self._experts: dict[Key, tuple] = {}
        for layer, (w_gate_EDF, w_up_EDF, w_down_EFD) in enumerate(weights):
            mats = [np.asarray(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
            E, D, F = self.num_experts, self.d_model, self.ffn_dim
            for name, w, shape in zip(("w_gate", "w_up", "w_down"), mats, ((E, D, F), (E, D, F), (E, F, D))):
                if w.shape != shape or w.dtype != self.dtype:
                    raise OffloadError(f"MoE layer {layer}: {name} is {w.shape} {w.dtype}, expected {shape} "
                                       f"{self.dtype}")
            for e in range(E):
                triple = tuple(np.ascontiguousarray(w[e]) for w in mats)
                self._experts[(layer, e)] = triple if host is None else tuple(jax.device_put(triple, host))
        jax.block_until_ready([v for v in self._experts.values() if host is not None])

    @property
    def bytes_per_expert(self) -> int:
        return 3 * self.d_model * self.ffn_dim * np.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.bytes_per_expert

    def slots_for(self, budget_bytes: int) -> int:
        """How many whole experts fit in budget_bytes."""
        return math.floor(budget_bytes / self.bytes_per_expert)

    def host(self, key: Key) -> tuple:
        """The expert's (w_gate [D, F], w_up [D, F], w_down [F, D]) in host memory."""
        return self._experts[key]

    def fetch(self, key: Key) -> tuple:
        """Starts copying one expert to the device; returns its three device arrays at once (the copy is
        asynchronous from a jax host memory space, synchronous from numpy)."""
        return tuple(jax.device_put(self._experts[key], self._device_sharding))

    def stacked(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One layer's experts as numpy (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D])."""
        mats = [self._experts[(layer, e)] for e in range(self.num_experts)]
        return tuple(np.stack([np.asarray(m[i]) for m in mats]) for i in range(3))
