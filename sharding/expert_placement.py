"""Where each routed expert lives on the P expert-parallel devices: any expert count, and hot-expert replicas.

Every device holds C slots (P * C global slots; slot s is device s // C's local slot s % C), and
`expert_of_slot[s]` is the expert stored in slot s (-1: an empty slot, zero weights, never routed to). Stacked in
slot order, the expert weights [P * C, ...] shard evenly over the expert axis whatever E is.

- The contiguous layout (`ExpertPlacement(E, P)`): device p owns experts [p * E // P, (p + 1) * E // P), floor or
  ceil of E / P of them, in its first slots; C = ceil(E / P). When P divides E this is the plain [E, ...] stacking
  (`identity`), so nothing is moved or remapped.
- Replicas (`replicate_hot_experts`, EPLB-style): from a routing histogram, the hottest experts get extra copies
  on spare slots and the copies are packed onto devices so the busiest device's load approaches the mean. A token
  routed to a replicated expert goes to copy (token index mod copies): the copies split its tokens evenly, and the
  output is unchanged (every copy holds the same weights).
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import jax.numpy as jnp
import numpy as np

from epsjax.sharding.errors import PlanError


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    devices: int
    table: tuple[int, ...] = ()  # expert_of_slot over the P * C slots; () = the contiguous layout

    def __post_init__(self):
        E, P = self.num_experts, self.devices
        if P < 1 or E < P:
            raise PlanError(f"{E} experts cannot be spread over {P} expert-parallel devices (need experts >= "
                            f"devices >= 1)")
        if self.table:
            table = np.asarray(self.table)
            if len(table) % P:
                raise PlanError(f"an expert placement over {P} devices needs a multiple of {P} slots, got "
                                f"{len(table)}")
            if table.min() < -1 or table.max() >= E:
                raise PlanError(f"expert placement slots hold experts outside [0, {E}): {sorted(set(table))}")
            missing = sorted(set(range(E)) - set(table.tolist()))
            if missing:
                raise PlanError(f"expert placement leaves experts {missing[:8]} without a slot")

    @property
    def slots(self) -> int:
        """Slots per device (C)."""
        return len(self.table) // self.devices if self.table else math.ceil(self.num_experts / self.devices)

    @property
    def num_slots(self) -> int:
        return self.devices * self.slots

    def owner(self) -> np.ndarray:
        """[E] the device holding each expert (its first copy)."""
        return (self.copies()[0][:, 0] // self.slots).astype(np.int32)

    def slot(self) -> np.ndarray:
        """[E] each expert's local slot on that device (its first copy)."""
        return (self.copies()[0][:, 0] % self.slots).astype(np.int32)

    def expert_of_slot(self) -> np.ndarray:
        """[P * C] the expert in each global slot, -1 for an empty slot."""
        if self.table:
            return np.asarray(self.table, np.int32)
        E, P, C = self.num_experts, self.devices, self.slots
        out = np.full(P * C, -1, np.int32)
        for p in range(P):
            lo, hi = p * E // P, (p + 1) * E // P
            out[p * C:p * C + hi - lo] = np.arange(lo, hi)
        return out

    @property
    def identity(self) -> bool:
        """Slot s holds expert s: the stacked [E, ...] weights are already in slot order."""
        return np.array_equal(self.expert_of_slot(), np.arange(self.num_experts))

    def experts_per_device(self) -> np.ndarray:
        """[P] distinct experts each device holds."""
        table = self.expert_of_slot().reshape(self.devices, self.slots)
        return np.asarray([len(set(row[row >= 0].tolist())) for row in table])

    def copies(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots_ER [E, R]: each expert's slots, padded by repeating its first; count_E [E]: how many)."""
        table = self.expert_of_slot()
        where = [np.flatnonzero(table == e) for e in range(self.num_experts)]
        R = max(len(w) for w in where)
        slots_ER = np.asarray([np.resize(w, R) for w in where], np.int32)
        return slots_ER, np.asarray([len(w) for w in where], np.int32)

    def slot_ids(self, ids_TK):
        """The slot each (token, k) assignment goes to: the expert's copy (token index mod its copies)."""
        slots_ER, count_E = (jnp.asarray(a) for a in self.copies())
        if slots_ER.shape[1] == 1:
            return slots_ER[ids_TK, 0]
        token_T1 = jnp.arange(ids_TK.shape[0], dtype=jnp.int32)[:, None]
        return slots_ER[ids_TK, token_T1 % count_E[ids_TK]]

    def to_slots(self, w_E__):
        """Stacked expert weights [E, ...] -> slot order [P * C, ...], empty slots zero."""
        table = self.expert_of_slot()
        if self.identity:
            return w_E__
        filled = (table >= 0).reshape((-1,) + (1,) * (w_E__.ndim - 1))
        return jnp.where(filled, w_E__[np.maximum(table, 0)], 0).astype(w_E__.dtype)

    def per_expert(self, per_slot_S):
        """Counts per slot [P * C] -> per expert [E] (copies summed)."""
        table = self.expert_of_slot()
        return jnp.zeros((self.num_experts,), per_slot_S.dtype).at[np.maximum(table, 0)].add(
            jnp.where(jnp.asarray(table >= 0), per_slot_S, 0))

    def device_load(self, histogram_E) -> np.ndarray:
        """[P] each device's share of the assignments when every expert's tokens split evenly over its copies."""
        histogram_E = np.asarray(histogram_E, np.float64)
        table = self.expert_of_slot()
        _, count_E = self.copies()
        per_slot = np.where(table >= 0, histogram_E[np.maximum(table, 0)] / count_E[np.maximum(table, 0)], 0.0)
        return per_slot.reshape(self.devices, self.slots).sum(axis=1)

    def imbalance(self, histogram_E) -> float:
        """max / mean device load under `histogram_E` (1.0: perfectly balanced)."""
        load = self.device_load(histogram_E)
        return float(load.max() / load.mean()) if load.sum() else 1.0


def replicate_hot_experts(histogram_E, devices: int, spare_slots: int = 1) -> ExpertPlacement:
    """An EPLB-style placement from a routing histogram [E] (counts or shares; the scheduler's RoutingHistogram
    keeps one per layer): C = ceil(E / P) + spare_slots slots per device; the P * C - E extra slots go, one at a
    time, to the expert with the most load per copy; then copies, heaviest first, each go to the least loaded
    device with a free slot that does not already hold that expert. A pure function of its arguments."""
    histogram_E = np.asarray(histogram_E, np.float64)
    E, P = len(histogram_E), devices
    if np.any(histogram_E < 0) or not np.all(np.isfinite(histogram_E)):
        raise PlanError("a routing histogram needs finite, non-negative counts per expert")
    if spare_slots < 0:
        raise PlanError(f"spare_slots must be >= 0, got {spare_slots}")
    C = math.ceil(E / P) + spare_slots
    if E < P:
        raise PlanError(f"{E} experts cannot be spread over {P} expert-parallel devices (need experts >= devices)")
    copies_E = np.ones(E, np.int64)
    extra = min(P * C - E, E * (P - 1))  # an expert has at most one copy per device
    heap = [(-histogram_E[e], e) for e in range(E)]  # by load per copy, heaviest first
    heapq.heapify(heap)
    for _ in range(extra):
        _, e = heapq.heappop(heap)
        copies_E[e] += 1
        if copies_E[e] < P:
            heapq.heappush(heap, (-histogram_E[e] / copies_E[e], e))
    items = sorted(((histogram_E[e] / copies_E[e], e) for e in range(E) for _ in range(copies_E[e])),
                   key=lambda item: (-item[0], item[1]))
    load, held = np.zeros(P), [[] for _ in range(P)]
    for share, e in items:
        free = ([p for p in range(P) if len(held[p]) < C and e not in held[p]]
                or [p for p in range(P) if len(held[p]) < C])  # a second copy on one device: useless, not wrong
        p = min(free, key=lambda p: (load[p], len(held[p]), p))
        held[p].append(e)
        load[p] += share
    table = [e for p in range(P) for e in sorted(held[p]) + [-1] * (C - len(held[p]))]
    return ExpertPlacement(E, P, tuple(int(e) for e in table))
