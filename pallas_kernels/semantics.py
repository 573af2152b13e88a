"""What a grouped expert GEMM means: argument checks, group -> slot, references.

Every backend in this package computes the same function; this module pins it
down once.

* ``lhs [M, K]`` holds rows sorted by group.  ``group_sizes [G]`` (int32) says
  how many consecutive rows each group owns; rows at index ``>= sum(group_sizes)``
  are padding and produce zero output rows (``M`` is static, the sum is traced).
* ``rhs [S, K, N]`` holds ``S`` weight matrices ("slots").  Each group ``g`` is
  resolved to one slot (or to none) by :func:`slot_of_group`:

  - default (expert parallelism): slot ``g - group_offset`` when
    ``group_offset <= g < group_offset + S``, otherwise none.  ``group_offset``
    may be a traced int32 scalar (``axis_index * E_local`` inside shard_map).
  - with ``slot_of_expert [G]`` (expert cache): slot ``slot_of_expert[g]``;
    ``-1`` means "not resident".  ``group_offset`` must then be the static 0
    (the table is already indexed by global expert id), else KernelError.

  Rows of a group without a slot (and slots outside ``[0, S)``) produce zeros.
  Resident experts must have distinct slots (a cache slot holds one expert);
  the dense backend relies on it.
* Products accumulate in float32; the output has ``lhs.dtype``.

The plain-jnp references at the bottom are the ground truth of the parity tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from epsjax.pallas_kernels.errors import KernelError

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_static_zero(group_offset) -> bool:
    """True when ``group_offset`` is a concrete (non-traced) zero."""
    if isinstance(group_offset, jax.core.Tracer):
        return False
    return int(np.asarray(group_offset)) == 0


def check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert) -> None:
    """Raises KernelError naming the argument when shapes, ranks or dtypes disagree."""
    if lhs.ndim != 2:
        raise KernelError(f"lhs must be [M, K]; got {lhs.shape=}")
    if rhs.ndim != 3:
        raise KernelError(f"rhs must be [E, K, N]; got {rhs.shape=}")
    if lhs.shape[1] != rhs.shape[1]:
        raise KernelError(f"lhs [M, K] and rhs [E, K, N] disagree on K: {lhs.shape=} {rhs.shape=}")
    if jnp.dtype(lhs.dtype) not in FLOAT_DTYPES:
        raise KernelError(f"lhs must be float32, bfloat16 or float16; got {lhs.dtype=}")
    if lhs.dtype != rhs.dtype:
        raise KernelError(f"lhs and rhs must share a dtype; got {lhs.dtype=} {rhs.dtype=}")
    _check_groups(group_sizes, group_offset, slot_of_expert)


def check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert) -> None:
    """Like :func:`check_group_gemm_args` for ``x [M, D]``, gate/up ``[E, D, F]``, down ``[E, F, D]``."""
    if x.ndim != 2:
        raise KernelError(f"x must be [M, D]; got {x.shape=}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.ndim != 3:
            raise KernelError(f"{name} must be rank 3; got {name}.shape={w.shape}")
        if w.dtype != x.dtype:
            raise KernelError(f"{name} must have x's dtype; got {x.dtype=} {name}.dtype={w.dtype}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise KernelError(f"x must be float32, bfloat16 or float16; got {x.dtype=}")
    e, d, f = w_gate.shape
    if w_gate.shape[1] != x.shape[1]:
        raise KernelError(f"w_gate must be [E, D, F] with D = x.shape[1]; got {x.shape=} {w_gate.shape=}")
    if w_up.shape != w_gate.shape:
        raise KernelError(f"w_up must match w_gate [E, D, F]; got {w_gate.shape=} {w_up.shape=}")
    if w_down.shape != (e, f, d):
        raise KernelError(f"w_down must be [E, F, D]; got {w_gate.shape=} {w_down.shape=}")
    _check_groups(group_sizes, group_offset, slot_of_expert)


def _check_groups(group_sizes, group_offset, slot_of_expert) -> None:
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise KernelError(f"group_sizes must be an int32 vector [G]; got {group_sizes.shape=} {group_sizes.dtype=}")
    if np.ndim(group_offset) != 0:
        raise KernelError(f"group_offset must be a scalar; got {np.shape(group_offset)=}")
    if slot_of_expert is None:
        return
    if slot_of_expert.shape != group_sizes.shape or not jnp.issubdtype(slot_of_expert.dtype, jnp.integer):
        raise KernelError(
            f"slot_of_expert must be an int32 vector shaped like group_sizes; "
            f"got {slot_of_expert.shape=} {slot_of_expert.dtype=} {group_sizes.shape=}")
    if not is_static_zero(group_offset):
        raise KernelError(
            "slot_of_expert is indexed by global expert id, so group_offset must be the static 0 "
            f"when it is given; got {group_offset=}")


def slot_of_group(group_sizes, num_slots: int, group_offset=0, slot_of_expert=None):
    """The rhs slot of each group: int32 [G], -1 where the group's rows produce zeros."""
    num_groups = group_sizes.shape[0]
    if slot_of_expert is None:
        slots = jnp.arange(num_groups, dtype=jnp.int32) - jnp.asarray(group_offset, jnp.int32)
    else:
        slots = slot_of_expert.astype(jnp.int32)
    return jnp.where((slots >= 0) & (slots < num_slots), slots, -1)


def group_bounds(group_sizes):
    """Row ranges of the groups: (starts [G], ends [G]) int32."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def group_of_row(group_sizes, m: int):
    """The group of each row: int32 [M], G for padding rows (index >= sum)."""
    _, ends = group_bounds(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def slot_of_row(group_sizes, slots, m: int):
    """The rhs slot of each row: int32 [M], -1 for padding and slotless groups."""
    padded = jnp.concatenate([slots, jnp.full((1,), -1, jnp.int32)])  # [G + 1]
    return padded[group_of_row(group_sizes, m)]


def varying_axes(*arrays) -> tuple[str, ...]:
    """The manual mesh axes (inside shard_map) over which any of ``arrays`` varies: a kernel's output, which
    depends on all of them, varies over these."""
    return tuple(sorted(set().union(*(jax.typeof(a).manual_axis_type.varying for a in jax.tree.leaves(arrays)))))


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """A Pallas kernel's output type: ``shape``/``dtype``, varying over the mesh axes its inputs vary over
    (under shard_map with check_vma, pallas_call refuses an output type that does not say)."""
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=frozenset(varying_axes(*inputs))))


def silu(x):
    return x * jax.nn.sigmoid(x)


# ----------------------------------------------------------------------------
# References (plain jnp).  E times the work of a grouped GEMM: for tests only.
# ----------------------------------------------------------------------------


def group_gemm_reference(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None):
    """Plain-jnp grouped GEMM: out[r] = lhs[r] @ rhs[slot(r)], zeros where no slot."""
    check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    slots = slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    row_slot = slot_of_row(group_sizes, slots, lhs.shape[0])  # [M]
    return _masked_sum(lhs, rhs, row_slot).astype(lhs.dtype)


def expert_ffn_reference(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None):
    """Plain-jnp expert FFN: (silu(x Wg) * (x Wu)) Wd per row, hidden stored in x.dtype."""
    check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    slots = slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    row_slot = slot_of_row(group_sizes, slots, x.shape[0])  # [M]
    gate = _masked_sum(x, w_gate, row_slot)  # [M, F] float32
    up = _masked_sum(x, w_up, row_slot)  # [M, F] float32
    hidden = (silu(gate) * up).astype(x.dtype)  # [M, F]
    return _masked_sum(hidden, w_down, row_slot).astype(x.dtype)


def _masked_sum(lhs, rhs, row_slot):
    """sum_s [row_slot == s] * (lhs @ rhs[s]) in float32: [M, N]."""

    def body(s, acc):
        prod = jnp.dot(lhs, rhs[s], preferred_element_type=jnp.float32)  # [M, N]
        return acc + jnp.where((row_slot == s)[:, None], prod, 0.0)

    init = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    # Inside shard_map the sum varies over every axis its inputs vary over; the loop carry must say so up front.
    axes = set().union(*(jax.typeof(a).mat.varying for a in (lhs, rhs, row_slot)))
    if axes:
        init = jax.lax.pcast(init, tuple(sorted(axes, key=str)), to="varying")
    return jax.lax.fori_loop(0, rhs.shape[0], body, init)
