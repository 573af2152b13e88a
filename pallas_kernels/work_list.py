"""The static worst-case work list shared by the tiled grouped-GEMM kernels.

The rows ``[0, M)`` split into ``G + 1`` segments: the ``G`` groups in order and
the padding tail ``[sum(group_sizes), M)``.  Cutting the rows into aligned row
tiles of ``block_m`` gives work items ``(tile, lo, hi, slot)``: the rows
``[lo, hi)`` of one segment inside tile ``tile``.  A tile that a group boundary
crosses appears once per segment it touches, so every row is written by exactly
one work item.  Items whose segment has no slot (padding, a group outside the
local experts, an expert not resident in the cache) have ``slot = -1``: the
kernel stores zeros there and skips the product.

The number of items is traced, but bounded statically by
``cdiv(M, block_m) + G`` (each of the ``G`` inner segment boundaries adds at
most one item to the ``cdiv(M, block_m)`` tiles).  Kernels use that bound as a
static grid and skip the idle items at the end (``lo == hi``), which is what
lets them run in interpret mode and keeps the launch shape independent of the
load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WorkList:
    """Per-item metadata, each int32 [num_items]; idle items have lo == hi == 0."""

    tile: jax.Array  # row tile index: rows [tile * block_m, (tile + 1) * block_m)
    lo: jax.Array  # first row of the item (absolute)
    hi: jax.Array  # one past the last row of the item (absolute)
    slot: jax.Array  # rhs slot, or -1: store zeros
    num_active: jax.Array  # int32 scalar: items [0, num_active) are real


def max_items(m: int, num_groups: int, block_m: int) -> int:
    """The static bound on the number of work items."""
    return -(-m // block_m) + num_groups


def build(group_sizes, slots, m: int, block_m: int) -> WorkList:
    """The work list of ``max_items(m, G, block_m)`` items (see module docstring).

    Args:
      group_sizes: [G] int32 rows per group.
      slots: [G] int32 slot per group, -1 for none (:func:`semantics.slot_of_group`).
      m: static row count (>= sum(group_sizes)).
      block_m: static row tile.
    """
    num_groups = group_sizes.shape[0]
    starts, ends = semantics.group_bounds(group_sizes)  # [G], [G]
    total = ends[-1] if num_groups else jnp.int32(0)
    seg_start = jnp.concatenate([starts, total[None]])  # [G + 1]
    seg_end = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])  # [G + 1]
    seg_slot = jnp.concatenate([slots.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
    first_tile = seg_start // block_m
    last_tile = (seg_end - 1) // block_m
    count = jnp.where(seg_end > seg_start, last_tile - first_tile + 1, 0)  # [G + 1]
    item_end = jnp.cumsum(count)  # [G + 1]
    item_start = item_end - count

    num_items = max_items(m, num_groups, block_m)
    w = jnp.arange(num_items, dtype=jnp.int32)
    seg = jnp.searchsorted(item_end, w, side="right").astype(jnp.int32)  # [W], G + 1 when idle
    active = seg <= num_groups
    seg = jnp.minimum(seg, num_groups)
    tile = first_tile[seg] + (w - item_start[seg])
    lo = jnp.maximum(seg_start[seg], tile * block_m)
    hi = jnp.minimum(seg_end[seg], (tile + 1) * block_m)
    zero = jnp.zeros_like(w)
    return WorkList(
        tile=jnp.where(active, tile, zero),
        lo=jnp.where(active, lo, zero),
        hi=jnp.where(active, hi, zero),
        slot=jnp.where(active, seg_slot[seg], -1),
        num_active=item_end[-1],
    )
