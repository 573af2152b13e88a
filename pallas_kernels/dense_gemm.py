"""DenseGemm: capacity-bucketed per-slot blocks through XLA's batched matmul.

Algorithm.  Each slot's rows are gathered into a zero-padded block of
``C`` rows, giving ``[S, C, K]``; one batched matmul with ``rhs [S, K, N]``
(cuBLAS / Eigen, the dense path) gives ``[S, C, N]``; a second gather puts
every row's result back in place (zeros for padding and slotless rows).

Dropless.  ``C`` is picked at run time from the actual group sizes: the
smallest of a few static capacities that holds the fullest slot, through a
``lax.switch`` whose last branch is the grouped-GEMM fallback (the load did
not fit any bucket).  Tokens are never dropped.

Tiling: ``capacities`` (static bucket sizes, rows per slot; ``None`` derives
``cdiv(M, S) * BUCKET_FACTORS`` rounded up to a multiple of 8) and ``fallback``
(the backend name of the grouped GEMM used past the last bucket; the caller
resolves it).  A Pallas dense kernel was not written: XLA's batched matmul is
the vendor GEMM, which a hand kernel matches at best.

Slots of resident experts must be distinct (a cache slot holds one expert):
the block of slot ``s`` is the rows of the one group that maps to ``s``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics
from epsjax.pallas_kernels.errors import KernelError


# Bucket sizes as multiples of the mean rows per slot. Balanced routing puts the fullest expert 5-20% above the
# mean, so steps of 1/8 and 1/4 keep the padding near that (with 1x, 2x, 4x it doubled the work: on CPU,
# Mixtral-like 8 experts x 256 rows, the expert FFN took 244 ms against 137 ms with these). Past 1.5x the
# grouped fallback, whose work follows the rows, is cheaper than padding every expert to the fullest one
# (2x-skewed load on the same shape: 453 ms dense at 4x buckets, 155 ms chunked).
BUCKET_FACTORS = (1, 1.125, 1.25, 1.5)


@dataclasses.dataclass(frozen=True)
class DenseTiling:
    """Capacity buckets (rows per slot) and the grouped fallback's backend name."""

    capacities: tuple[int, ...] | None = None
    fallback: str = "auto"

    def __post_init__(self):
        if self.capacities is not None:
            caps = self.capacities
            if (not isinstance(caps, tuple) or not caps
                or any(not isinstance(c, int) or c < 1 for c in caps) or list(caps) != sorted(set(caps))):
                raise KernelError(f"DenseTiling.capacities must be a strictly increasing tuple of ints >= 1; got "
                                  f"{caps=}")
        if not isinstance(self.fallback, str):
            raise KernelError(f"DenseTiling.fallback must be a backend name; got {self.fallback=}")

    def buckets(self, m: int, num_slots: int) -> tuple[int, ...]:
        """The static capacities for M rows over S slots."""
        if self.capacities is not None:
            return tuple(sorted({min(c, m) for c in self.capacities}))
        base = -(-m // max(num_slots, 1))
        caps = sorted({min(m, -(-math.ceil(base * f) // 8) * 8) for f in BUCKET_FACTORS})
        return tuple(caps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Where each slot's rows are and where each row's result is."""

    slot_start: jax.Array  # [S] first row of the slot's group
    slot_size: jax.Array  # [S] rows of the slot's group (0 when the slot is unused)
    row_slot: jax.Array  # [M] slot of the row, -1 for padding / slotless
    row_pos: jax.Array  # [M] position of the row inside its slot's block


def slot_layout(group_sizes, slots, m: int, num_slots: int) -> SlotLayout:
    """The block layout; ``slots`` [G] from :func:`semantics.slot_of_group`."""
    num_groups = group_sizes.shape[0]
    starts, _ = semantics.group_bounds(group_sizes)
    resident = slots >= 0
    target = jnp.where(resident, slots, num_slots)  # out of range -> dropped by the scatter
    group_of_slot = jnp.full((num_slots,), num_groups, jnp.int32).at[target].set(
        jnp.arange(num_groups, dtype=jnp.int32), mode="drop")
    starts_ext = jnp.concatenate([starts, jnp.zeros((1,), jnp.int32)])
    sizes_ext = jnp.concatenate([group_sizes.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    row_group = semantics.group_of_row(group_sizes, m)  # [M], G for padding
    slots_ext = jnp.concatenate([slots, jnp.full((1,), -1, jnp.int32)])
    return SlotLayout(
        slot_start=starts_ext[group_of_slot],
        slot_size=sizes_ext[group_of_slot],
        row_slot=slots_ext[row_group],
        row_pos=jnp.arange(m, dtype=jnp.int32) - starts_ext[row_group],
    )


def to_blocks(x, layout: SlotLayout, capacity: int):
    """[M, K] rows -> [S, C, K] zero-padded slot blocks."""
    c = jnp.arange(capacity, dtype=jnp.int32)  # [C]
    rows = layout.slot_start[:, None] + c[None, :]  # [S, C]
    valid = c[None, :] < layout.slot_size[:, None]  # [S, C]
    blocks = x[jnp.clip(rows, 0, x.shape[0] - 1)]  # [S, C, K]
    return jnp.where(valid[..., None], blocks, jnp.zeros((), x.dtype))


def from_blocks(blocks, layout: SlotLayout):
    """[S, C, N] slot blocks -> [M, N] rows, zeros for padding and slotless rows."""
    keep = layout.row_slot >= 0  # [M]
    out = blocks[jnp.maximum(layout.row_slot, 0), jnp.clip(layout.row_pos, 0, blocks.shape[1] - 1)]  # [M, N]
    return jnp.where(keep[:, None], out, jnp.zeros((), blocks.dtype))


def bucketed(branch: Callable[[int], jax.Array], fallback: Callable[[], jax.Array],
             layout: SlotLayout, capacities: tuple[int, ...]):
    """Runs ``branch(C)`` for the smallest capacity C holding the fullest slot, else ``fallback()``."""
    fullest = jnp.max(layout.slot_size)
    index = jnp.sum(jnp.asarray(capacities, jnp.int32) < fullest)  # len(capacities) = no bucket fits
    branches = [functools.partial(branch, c) for c in capacities] + [fallback]
    return jax.lax.switch(index, branches)


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: DenseTiling | None = None, fallback_fn: Callable | None = None,
               interpret: bool = False):
    """Dropless dense grouped GEMM (semantics: :mod:`pallas_kernels.semantics`).

    ``fallback_fn(lhs, rhs, group_sizes, group_offset=, slot_of_expert=)`` runs
    when the fullest slot exceeds the last capacity (default: lax.ragged_dot).
    """
    del interpret  # plain XLA
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling)
    capacities = tiling.buckets(lhs.shape[0], rhs.shape[0])
    return _group_gemm(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32), slot_of_expert,
                       capacities=capacities, fallback_fn=fallback_fn or _default_fallback("group_gemm"))


@functools.partial(jax.jit, static_argnames=("capacities", "fallback_fn"))
def _group_gemm(lhs, rhs, group_sizes, group_offset, slot_of_expert, *, capacities, fallback_fn):
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    layout = slot_layout(group_sizes, slots, lhs.shape[0], rhs.shape[0])

    def branch(capacity):
        blocks = to_blocks(lhs, layout, capacity)  # [S, C, K]
        out = jnp.einsum("sck,skn->scn", blocks, rhs, preferred_element_type=jnp.float32)  # [S, C, N]
        return from_blocks(out, layout).astype(lhs.dtype)

    def fallback():
        return fallback_fn(lhs, rhs, group_sizes, **_indirection(group_offset, slot_of_expert))

    return bucketed(branch, fallback, layout, capacities)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: DenseTiling | None = None, fallback_fn: Callable | None = None,
               interpret: bool = False):
    """Dropless dense expert FFN: one gather into blocks, three batched matmuls, one gather back."""
    del interpret
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling)
    capacities = tiling.buckets(x.shape[0], w_gate.shape[0])
    return _expert_ffn(x, w_gate, w_up, w_down, group_sizes, jnp.asarray(group_offset, jnp.int32),
                       slot_of_expert, capacities=capacities,
                       fallback_fn=fallback_fn or _default_fallback("expert_ffn"))


@functools.partial(jax.jit, static_argnames=("capacities", "fallback_fn"))
def _expert_ffn(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert, *, capacities,
                fallback_fn):
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    layout = slot_layout(group_sizes, slots, x.shape[0], w_gate.shape[0])

    def branch(capacity):
        blocks = to_blocks(x, layout, capacity)  # [S, C, D]
        gate = jnp.einsum("scd,sdf->scf", blocks, w_gate, preferred_element_type=jnp.float32)  # [S, C, F]
        up = jnp.einsum("scd,sdf->scf", blocks, w_up, preferred_element_type=jnp.float32)  # [S, C, F]
        hidden = (semantics.silu(gate) * up).astype(x.dtype)  # [S, C, F]
        out = jnp.einsum("scf,sfd->scd", hidden, w_down, preferred_element_type=jnp.float32)  # [S, C, D]
        return from_blocks(out, layout).astype(x.dtype)

    def fallback():
        return fallback_fn(x, w_gate, w_up, w_down, group_sizes, **_indirection(group_offset, slot_of_expert))

    return bucketed(branch, fallback, layout, capacities)


def _indirection(group_offset, slot_of_expert):
    """Keyword arguments for the fallback: slot_of_expert implies a static zero offset."""
    if slot_of_expert is not None:
        return {"slot_of_expert": slot_of_expert}
    return {"group_offset": group_offset}


def _default_fallback(op):
    from epsjax.pallas_kernels import ragged_dot  # the XLA grouped GEMM

    return ragged_dot.group_gemm if op == "group_gemm" else ragged_dot.expert_ffn


def _check_tiling(tiling):
    if tiling is None:
        return DenseTiling()
    if not isinstance(tiling, DenseTiling):
        raise KernelError(f"the dense backend takes a DenseTiling; got {tiling=}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
