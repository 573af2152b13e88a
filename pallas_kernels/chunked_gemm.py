"""GroupGemm for CPU: a plain-XLA loop over row chunks (no Pallas).

Algorithm.  The rows are cut into the work items of :mod:`pallas_kernels.work_list`
with ``block_m = chunk`` rows; a ``lax.while_loop`` runs over the traced number
of items, and each iteration multiplies one ``[chunk, K]`` row tile by its
slot's ``[K, N]`` matrix (a dynamic index into rhs), keeps the rows of the
item's segment and adds them into the output tile.  Slotless items are
skipped (the output starts at zero).  Work is ``(M + G * chunk) * K * N`` no
matter how skewed the load, against ``E * M * K * N`` for XLA:CPU's
ragged_dot and ``S * C * K * N`` for the dense buckets.

The expert FFN runs all three products of an item in the same iteration, so
its hidden ``[chunk, F]`` tile stays in cache.

Tiling: ``chunk`` (rows per iteration).  Made for XLA:CPU, where one large
Eigen GEMM per iteration is efficient and a while loop is cheap; on GPUs the
Pallas kernels do the same with a parallel grid.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import semantics, work_list


@dataclasses.dataclass(frozen=True)
class ChunkTiling:
    """Rows per loop iteration."""

    chunk: int = 64

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"ChunkTiling.chunk must be a positive int; got {self.chunk=}")


def _loop(x, weights, group_sizes, slots, chunk: int, item_fn):
    """Accumulates ``item_fn(x_tile [chunk, K], slot) -> [chunk, N]`` over the work items."""
    m = x.shape[0]
    n = item_fn.out_dim
    items = work_list.build(group_sizes, slots, m, chunk)
    m_pad = -(-m // chunk) * chunk
    x = jnp.pad(x, ((0, m_pad - m), (0, 0)))  # [M_pad, K], aligned tiles never clamp
    offsets = jnp.arange(chunk, dtype=jnp.int32)

    def body(state):
        i, out = state
        tile, lo, hi, slot = items.tile[i], items.lo[i], items.hi[i], items.slot[i]
        row0 = tile * chunk

        def compute(out):
            x_tile = jax.lax.dynamic_slice_in_dim(x, row0, chunk)  # [chunk, K]
            y = item_fn(x_tile, weights, slot)  # [chunk, N] float32
            rows = row0 + offsets
            y = jnp.where(((rows >= lo) & (rows < hi))[:, None], y, 0.0)
            old = jax.lax.dynamic_slice_in_dim(out, row0, chunk)
            return jax.lax.dynamic_update_slice_in_dim(out, old + y, row0, 0)

        out = jax.lax.cond(slot >= 0, compute, lambda o: o, out)
        return i + 1, out

    out = jnp.zeros((m_pad, n), jnp.float32)  # [M_pad, N]
    # Under shard_map the carry must vary over the mesh axes its updates vary over (those of every input).
    varying = semantics.varying_axes(x, weights, items)
    if varying:
        out = jax.lax.pcast(out, varying, to="varying")
    _, out = jax.lax.while_loop(lambda s: s[0] < items.num_active, body, (jnp.int32(0), out))
    return out[:m]


class _Gemm:
    def __init__(self, n):
        self.out_dim = n

    def __call__(self, x_tile, weights, slot):
        (rhs,) = weights
        return jnp.dot(x_tile, rhs[slot], preferred_element_type=jnp.float32)


class _Ffn:
    def __init__(self, d):
        self.out_dim = d

    def __call__(self, x_tile, weights, slot):
        w_gate, w_up, w_down = weights
        gate = jnp.dot(x_tile, w_gate[slot], preferred_element_type=jnp.float32)  # [chunk, F]
        up = jnp.dot(x_tile, w_up[slot], preferred_element_type=jnp.float32)  # [chunk, F]
        hidden = (semantics.silu(gate) * up).astype(x_tile.dtype)
        return jnp.dot(hidden, w_down[slot], preferred_element_type=jnp.float32)  # [chunk, D]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _group_gemm(lhs, rhs, group_sizes, slots, chunk):
    return _loop(lhs, (rhs,), group_sizes, slots, chunk, _Gemm(rhs.shape[2])).astype(lhs.dtype)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, chunk):
    return _loop(x, (w_gate, w_up, w_down), group_sizes, slots, chunk, _Ffn(x.shape[1])).astype(x.dtype)


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: ChunkTiling | None = None, interpret: bool = False):
    """Grouped GEMM as a loop over row chunks (semantics: :mod:`pallas_kernels.semantics`)."""
    del interpret  # plain XLA
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _group_gemm(lhs, rhs, group_sizes, slots, tiling.chunk)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: ChunkTiling | None = None, interpret: bool = False):
    """Expert FFN as a loop over row chunks, all three products per chunk."""
    del interpret
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, tiling.chunk)


def _check_tiling(tiling):
    if tiling is None:
        return ChunkTiling()
    if not isinstance(tiling, ChunkTiling):
        raise ValueError(f"the chunked backend takes a ChunkTiling; got {tiling=}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
