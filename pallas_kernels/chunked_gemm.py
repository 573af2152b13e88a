"""GroupGemm for CPU: a plain-XLA loop over row chunks of each group (no Pallas).

Algorithm.  Each group's rows are cut into chunks of ``chunk`` rows that start at the group's first row (not at
aligned tiles): group ``g`` of ``n_g`` rows gives ``ceil(n_g / chunk)`` items, groups without a slot give none
(their rows stay zero).  A ``lax.while_loop`` runs over the traced number of items; each iteration multiplies
one ``[chunk, K]`` row window by its slot's ``[K, N]`` matrix (a dynamic index into rhs) and writes back only
the rows of its group.  Every slot's weights are read once per item, so a group that fits one chunk is read
once: at decode (a few rows per expert) the loop reads each routed expert once and no other, and with a small
``chunk`` it does about as many FLOPs as there are rows.  Work is at most ``(M + G * chunk) * K * N``
whatever the skew, against ``E * M * K * N`` for XLA:CPU's ragged_dot and ``S * C * K * N`` for the dense
buckets.

The expert FFN runs all three products of an item in the same iteration, so its hidden ``[chunk, F]`` tile stays
in cache.

Tiling: ``chunk`` (rows per iteration) and ``step``: small for few rows per expert (the weight reads dominate),
large for many (fewer, larger GEMMs); the selector takes them from the measured CPU table, and without one
:func:`default_tiling` sizes them from the mean rows per group.

XLA:CPU copies an expert's weight matrices out of the stacked ``[E, K, N]`` tensor before each product (a
dynamic slice is not read in place). Whole matrices copied that way cost about three times their bytes in DRAM
traffic (a Mixtral-like expert's three matrices, 44 MB, outgrow the cache); so each item reads its weights in
column pieces of at most :data:`PIECE_COLUMNS` (the FFN sums the down projection over pieces of the hidden
dim), whose copies stay in cache.  Made for XLA:CPU, where one
large Eigen GEMM per iteration is efficient and a while loop is cheap; on GPUs the Pallas kernels do the same
with a parallel grid.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics
from epsjax.pallas_kernels.errors import KernelError

# Weight column pieces: XLA:CPU copies each dynamic slice of a weight tensor before a product; pieces of this many
# columns keep the copy in cache (a [1024, 512] float32 piece is 2 MB) instead of streaming whole matrices through
# DRAM twice.
PIECE_COLUMNS = 512


@dataclasses.dataclass(frozen=True)
class ChunkTiling:
    """At most ``chunk`` rows per loop iteration, computed in a window of the item's rows rounded up to a multiple
    of ``step`` (``step`` divides ``chunk``; ``step == chunk``: every window is ``chunk`` rows)."""

    chunk: int = 64
    step: int | None = None  # None: chunk

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise KernelError(f"ChunkTiling.chunk must be a positive int; got {self.chunk=}")
        if self.step is not None and (not isinstance(self.step, int) or self.step < 1 or self.chunk % self.step):
            raise KernelError(f"ChunkTiling.step must be a positive int dividing chunk; got {self.step=} "
                              f"{self.chunk=}")

    @property
    def windows(self) -> tuple[int, ...]:
        """The static window sizes: step, 2 * step, ..., chunk."""
        step = self.step or self.chunk
        return tuple(range(step, self.chunk + 1, step))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkList:
    """Per-item row windows, each int32 [max_items]; items past num_active are idle."""

    lo: jax.Array        # first row of the item (its group's rows from here)
    hi: jax.Array        # one past the item's last row (at most lo + chunk, at most its group's end)
    slot: jax.Array      # rhs slot of the item's group
    num_active: jax.Array  # int32 scalar


def chunk_list(group_sizes, slots, m: int, chunk: int) -> ChunkList:
    """The items of every group with a slot: group g's rows [start_g, end_g) in runs of ``chunk`` rows from
    start_g (the last one shorter). At most ``cdiv(m, chunk) + G`` items (static)."""
    num_groups = group_sizes.shape[0]
    starts, ends = semantics.group_bounds(group_sizes)  # [G], [G]
    count = jnp.where(slots >= 0, -(-(ends - starts) // chunk), 0)  # [G] items per group
    item_end = jnp.cumsum(count)
    item_start = item_end - count
    w = jnp.arange(-(-m // chunk) + num_groups, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(item_end, w, side="right").astype(jnp.int32), num_groups - 1)
    lo = starts[g] + (w - item_start[g]) * chunk
    return ChunkList(lo=lo, hi=jnp.minimum(lo + chunk, ends[g]), slot=slots[g].astype(jnp.int32),
                     num_active=item_end[-1] if num_groups else jnp.int32(0))


def _loop(x, weights, group_sizes, slots, tiling: ChunkTiling, item_fn):
    """``item_fn(x_window [w, K], slot) -> [w, N]`` written to each item's rows; zeros elsewhere. The window w
    is the item's row count rounded up to tiling.step (a lax.switch over the static sizes), so a group's last,
    short run computes at most step - 1 rows it does not need."""
    m = x.shape[0]
    n = item_fn.out_dim
    chunk, windows = tiling.chunk, tiling.windows
    step = windows[0]
    items = chunk_list(group_sizes, slots, m, chunk)
    x = jnp.pad(x, ((0, chunk), (0, 0)))  # [M + chunk, K]: a window starting at any row stays in bounds

    def window(size):
        def run(lo, hi, slot, out):
            x_window = jax.lax.dynamic_slice_in_dim(x, lo, size)  # [size, K]
            y = item_fn(x_window, weights, slot).astype(out.dtype)  # [size, N]
            old = jax.lax.dynamic_slice_in_dim(out, lo, size)
            mine = (lo + jnp.arange(size, dtype=jnp.int32) < hi)[:, None]  # rows past hi belong to other items
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), lo, 0)
        return run

    branches = [window(size) for size in windows]

    def body(state):
        i, out = state
        lo, hi, slot = items.lo[i], items.hi[i], items.slot[i]
        if len(branches) == 1:
            return i + 1, branches[0](lo, hi, slot, out)
        return i + 1, jax.lax.switch((hi - lo - 1) // step, branches, lo, hi, slot, out)

    out = jnp.zeros((m + chunk, n), x.dtype)  # [M + chunk, N]
    # Under shard_map the carry must vary over the mesh axes its updates vary over (those of every input).
    varying = semantics.varying_axes(x, weights, items)
    if varying:
        out = jax.lax.pcast(out, varying, to="varying")
    _, out = jax.lax.while_loop(lambda s: s[0] < items.num_active, body, (jnp.int32(0), out))
    return out[:m]


def piece(n: int, largest: int = PIECE_COLUMNS) -> int:
    """The width of the column pieces a weight matrix of ``n`` columns is read in: the largest divisor of n that
    is at most ``largest`` and a multiple of 8 (n itself when it is small or has none)."""
    if n <= largest:
        return n
    return next((p for p in range(largest - largest % 8, 7, -8) if n % p == 0), n)


class _Gemm:
    """x_tile @ rhs[slot], the weights read in column pieces (see the module docstring)."""

    def __init__(self, n):
        self.out_dim = n

    def __call__(self, x_tile, weights, slot):
        (rhs,) = weights
        k, n = rhs.shape[1:]
        width = piece(n)
        if width == n:
            return jnp.dot(x_tile, rhs[slot], preferred_element_type=jnp.float32)

        def one(j):  # [chunk, width]
            w = jax.lax.dynamic_slice(rhs, (slot, 0, j * width), (1, k, width))[0]
            return jnp.dot(x_tile, w, preferred_element_type=jnp.float32)

        pieces = jax.lax.map(one, jnp.arange(n // width))  # [n / width, chunk, width]
        return pieces.transpose(1, 0, 2).reshape(x_tile.shape[0], n)


class _Ffn:
    """silu(x W_gate) * (x W_up) W_down for one slot, summed over pieces of the FFN dim (see the module
    docstring): each piece reads [D, width] of W_gate and W_up and [width, D] of W_down."""

    def __init__(self, d):
        self.out_dim = d

    def __call__(self, x_tile, weights, slot):
        w_gate, w_up, w_down = weights
        d, f = w_gate.shape[1:]
        width = piece(f)

        def one(j, acc):  # acc: [chunk, D] float32
            g = jax.lax.dynamic_slice(w_gate, (slot, 0, j * width), (1, d, width))[0]  # [D, width]
            u = jax.lax.dynamic_slice(w_up, (slot, 0, j * width), (1, d, width))[0]
            dn = jax.lax.dynamic_slice(w_down, (slot, j * width, 0), (1, width, d))[0]  # [width, D]
            gate = jnp.dot(x_tile, g, preferred_element_type=jnp.float32)  # [chunk, width]
            up = jnp.dot(x_tile, u, preferred_element_type=jnp.float32)
            hidden = (semantics.silu(gate) * up).astype(x_tile.dtype)
            return acc + jnp.dot(hidden, dn, preferred_element_type=jnp.float32)

        init = jnp.zeros((x_tile.shape[0], d), jnp.float32)
        varying = semantics.varying_axes(x_tile, weights, slot)
        if varying:
            init = jax.lax.pcast(init, varying, to="varying")
        if width == f:
            return one(0, init)
        return jax.lax.fori_loop(0, f // width, one, init)


@functools.partial(jax.jit, static_argnames=("tiling",))
def _group_gemm(lhs, rhs, group_sizes, slots, tiling):
    return _loop(lhs, (rhs,), group_sizes, slots, tiling, _Gemm(rhs.shape[2]))


@functools.partial(jax.jit, static_argnames=("tiling",))
def _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, tiling):
    return _loop(x, (w_gate, w_up, w_down), group_sizes, slots, tiling, _Ffn(x.shape[1]))


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: ChunkTiling | None = None, interpret: bool = False):
    """Grouped GEMM as a loop over row chunks (semantics: :mod:`pallas_kernels.semantics`)."""
    del interpret  # plain XLA
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling, lhs.shape[0], group_sizes.shape[0])
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _group_gemm(lhs, rhs, group_sizes, slots, tiling)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: ChunkTiling | None = None, interpret: bool = False):
    """Expert FFN as a loop over row chunks, all three products per chunk."""
    del interpret
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling, x.shape[0], group_sizes.shape[0])
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, tiling)


def default_tiling(m: int, num_groups: int) -> ChunkTiling:
    """The tiling for M rows over G groups when none is given (no measured table): windows about the mean group
    size (a power of two in [8, 512]), rounded to steps of 1/16 of that (at least 8 rows)."""
    mean = -(-m // max(num_groups, 1))
    chunk = min(512, max(8, 1 << (mean - 1).bit_length()))
    return ChunkTiling(chunk, max(8, chunk // 16))


def _check_tiling(tiling, m: int, num_groups: int):
    if tiling is None:
        return default_tiling(m, num_groups)
    if not isinstance(tiling, ChunkTiling):
        raise KernelError(f"the chunked backend takes a ChunkTiling; got {tiling=}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
