"""The XLA baseline: jax.lax.ragged_dot behind the package's interface.

``lax.ragged_dot`` needs group i of the rows to use ``rhs[i]``.  When the
groups map to slots in order (no offset, no cache), the call is direct.
Otherwise the rows are permuted into slot order first (a stable sort on the
row's slot, slotless rows last, where ragged_dot leaves them out), and the
output is permuted back.  The permutation costs one gather of ``lhs`` and
one of the output, small next to reading the weights.

On XLA:GPU this is a real grouped GEMM.  XLA:CPU expands it into a masked
dense product (E times the work), so on CPU it is a correctness baseline,
never the fast path; and since that expansion multiplies every row by every
expert's weights and then by a 0/1 mask, one expert's NaN or Inf would reach
every row (0 * NaN = NaN).  Off GPU this backend therefore computes the same
function as a where-masked loop over the slots (the reference's expansion),
so a non-finite expert only reaches the rows routed to it, as on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics, targets


@functools.partial(jax.jit, static_argnames=("direct",))
def _ragged_dot(lhs, rhs, group_sizes, slots, direct: bool):
    if direct:
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
        total = jnp.sum(group_sizes)
        keep = jnp.arange(lhs.shape[0]) < total  # [M]
        return jnp.where(keep[:, None], out, 0.0).astype(lhs.dtype)
    perm, inv_perm, sizes, keep = permute_to_slots(group_sizes, slots, lhs.shape[0], rhs.shape[0])
    out = jax.lax.ragged_dot(lhs[perm], rhs, sizes, preferred_element_type=jnp.float32)  # [M, N]
    return jnp.where(keep[:, None], out[inv_perm], 0.0).astype(lhs.dtype)


def permute_to_slots(group_sizes, slots, m: int, num_slots: int):
    """The slot-order permutation of the rows.

    Returns (perm [M], inv_perm [M], sizes [S], keep [M]): ``x[perm]`` lists the
    rows of slot 0, then slot 1, ..., then slotless and padding rows;
    ``y[inv_perm]`` undoes it; ``sizes[s]`` counts the rows of slot s; ``keep``
    marks rows that have a slot.
    """
    row_slot = semantics.slot_of_row(group_sizes, slots, m)  # [M]
    keep = row_slot >= 0
    key = jnp.where(keep, row_slot, num_slots)
    perm = jnp.argsort(key, stable=True).astype(jnp.int32)
    inv_perm = jnp.zeros((m,), jnp.int32).at[perm].set(jnp.arange(m, dtype=jnp.int32))
    sizes = jnp.zeros((num_slots + 1,), jnp.int32).at[key].add(1)[:num_slots]
    return perm, inv_perm, sizes, keep


def _masked_expansion() -> bool:
    """Whether XLA would expand ragged_dot into a 0/1-masked dense product here (everything but a GPU)."""
    return not targets.current().is_gpu


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None):
    """Grouped GEMM through lax.ragged_dot (see :mod:`pallas_kernels.semantics`)."""
    if _masked_expansion():
        return semantics.group_gemm_reference(lhs, rhs, group_sizes, group_offset=group_offset,
                                              slot_of_expert=slot_of_expert)
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    direct = (slot_of_expert is None and semantics.is_static_zero(group_offset)
              and group_sizes.shape[0] == rhs.shape[0])
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _ragged_dot(lhs, rhs, group_sizes, slots, direct)


@jax.jit
def _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots):
    perm, inv_perm, sizes, keep = permute_to_slots(group_sizes, slots, x.shape[0], w_gate.shape[0])
    xp = x[perm]  # [M, D]
    gate = jax.lax.ragged_dot(xp, w_gate, sizes, preferred_element_type=jnp.float32)  # [M, F]
    up = jax.lax.ragged_dot(xp, w_up, sizes, preferred_element_type=jnp.float32)  # [M, F]
    hidden = (semantics.silu(gate) * up).astype(x.dtype)  # [M, F]
    out = jax.lax.ragged_dot(hidden, w_down, sizes, preferred_element_type=jnp.float32)  # [M, D]
    return jnp.where(keep[:, None], out[inv_perm], 0.0).astype(x.dtype)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None):
    """Expert FFN through three lax.ragged_dot calls on slot-ordered rows."""
    if _masked_expansion():
        return semantics.expert_ffn_reference(x, w_gate, w_up, w_down, group_sizes, group_offset=group_offset,
                                              slot_of_expert=slot_of_expert)
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots)


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
