"""Grouped GEMM as a Pallas kernel through the Triton lowering (any CUDA GPU).

Algorithm.  The rows are cut into the work items of :mod:`pallas_kernels.work_list`
(one aligned ``block_m`` row tile x one group segment).  The grid is
``(max_items, cdiv(N, block_n))``, static; a program reads its item's
``(tile, lo, hi, slot)``, loads only the rows ``[lo, hi)`` of the tile (masked),
runs a ``block_k`` loop of ``[block_m, block_k] x [block_k, block_n]`` dots into a
float32 accumulator, and stores the rows ``[lo, hi)`` with a masked store.
Items of slotless segments store zeros; idle items (past the traced number of
items) return at once.  The item axis is the fast grid axis so consecutive
programs reuse the same ``rhs`` column block from L2.

The same kernel has a fused gate/up mode for the expert FFN: two weight
matrices share the lhs loads and the epilogue writes ``silu(x Wg) * (x Wu)``,
so the ``[M, 2F]`` intermediate never reaches memory.

Tiling: ``block_m, block_n, block_k`` (powers of two, >= 16 for the Triton
dot), ``num_warps``, ``num_stages`` (Triton's software pipelining of the K
loop).  Runs on CPU with ``interpret=True`` (the Pallas HLO interpreter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from epsjax.pallas_kernels import semantics, work_list
from epsjax.pallas_kernels.errors import KernelError


@dataclasses.dataclass(frozen=True)
class TritonTiling:
    """Tile sizes and Triton launch parameters."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise KernelError(f"TritonTiling.{name} must be a power of two >= 16; got {value=}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise KernelError(f"TritonTiling.num_warps must be 1, 2, 4, 8 or 16; got {self.num_warps=}")
        if not 1 <= self.num_stages <= 8:
            raise KernelError(f"TritonTiling.num_stages must be in [1, 8]; got {self.num_stages=}")


def _kernel(tile_ref, lo_ref, hi_ref, slot_ref, lhs_ref, *refs, tiling: TritonTiling, fused: bool):
    """One (work item, column block) program.

    tile_ref, lo_ref, hi_ref, slot_ref: [W] int32 work list.
    lhs_ref: [M, K].  refs: rhs_ref [S, K, N] (and up_ref [S, K, N] when fused), out_ref [M, N].
    """
    *rhs_refs, out_ref = refs
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    m, k = lhs_ref.shape
    n = out_ref.shape[1]
    item = pl.program_id(0)
    n_block = pl.program_id(1)
    tile = tile_ref[item]
    lo = lo_ref[item]
    hi = hi_ref[item]
    slot = slot_ref[item]
    row0 = tile * bm
    col0 = n_block * bn
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)  # [block_m]
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)  # [block_n]
    row_mask = ((rows >= lo) & (rows < hi))[:, None]  # [block_m, 1]
    col_mask = (cols < n)[None, :]  # [1, block_n]

    def k_step(kb, accs):
        k0 = kb * bk
        ks = k0 + jnp.arange(bk, dtype=jnp.int32)  # [block_k]
        a = plgpu_triton.load(  # [block_m, block_k]
            lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)],
            mask=row_mask & (ks < k)[None, :], other=0.0)
        new = []
        for acc, rhs_ref in zip(accs, rhs_refs):
            b = plgpu_triton.load(  # [block_k, block_n]
                rhs_ref.at[slot, pl.ds(k0, bk), pl.ds(col0, bn)],
                mask=(ks < k)[:, None] & col_mask, other=0.0)
            new.append(acc + jnp.dot(a, b, preferred_element_type=jnp.float32))  # [block_m, block_n]
        return tuple(new)

    def product():
        init = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in rhs_refs)
        accs = jax.lax.fori_loop(0, pl.cdiv(k, bk), k_step, init)
        if fused:
            gate, up = accs
            return semantics.silu(gate) * up
        return accs[0]

    @pl.when(lo < hi)
    def _():
        out = jax.lax.cond(slot >= 0, product, lambda: jnp.zeros((bm, bn), jnp.float32))
        plgpu_triton.store(
            out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], out.astype(out_ref.dtype),
            mask=row_mask & col_mask)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def _call(lhs, rhs_list, group_sizes, slots, *, tiling: TritonTiling, interpret: bool):
    m = lhs.shape[0]
    n = rhs_list[0].shape[2]
    items = work_list.build(group_sizes, slots, m, tiling.block_m)
    num_items = items.tile.shape[0]
    kernel = functools.partial(_kernel, tiling=tiling, fused=len(rhs_list) == 2)
    return pl.pallas_call(
        kernel,
        out_shape=semantics.out_struct((m, n), lhs.dtype, lhs, *rhs_list, items),
        grid=(num_items, pl.cdiv(n, tiling.block_n)),
        compiler_params=plgpu_triton.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="gate_up_triton" if len(rhs_list) == 2 else "group_gemm_triton",  # the kernel's name in ptxas reports
    )(items.tile, items.lo, items.hi, items.slot, lhs, *rhs_list)


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: TritonTiling | None = None, interpret: bool = False):
    """Grouped GEMM ``[M, K] x [S, K, N] -> [M, N]`` (semantics: :mod:`pallas_kernels.semantics`)."""
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = _check_tiling(tiling)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _call(lhs, (rhs,), group_sizes, slots, tiling=tiling, interpret=interpret)


def gate_up(x, w_gate, w_up, group_sizes, *, group_offset=0, slot_of_expert=None,
            tiling: TritonTiling | None = None, interpret: bool = False):
    """Fused ``silu(x @ w_gate[s]) * (x @ w_up[s])``: [M, D] x 2 [S, D, F] -> [M, F] in x.dtype."""
    semantics.check_group_gemm_args(x, w_gate, group_sizes, group_offset, slot_of_expert)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise KernelError(f"w_up must match w_gate; got {w_gate.shape=} {w_up.shape=} {w_up.dtype=}")
    tiling = _check_tiling(tiling)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _call(x, (w_gate, w_up), group_sizes, slots, tiling=tiling, interpret=interpret)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: TritonTiling | None = None, interpret: bool = False):
    """Expert FFN: the fused gate/up kernel, then the grouped down projection."""
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    kw = dict(group_offset=group_offset, slot_of_expert=slot_of_expert, tiling=tiling, interpret=interpret)
    hidden = gate_up(x, w_gate, w_up, group_sizes, **kw)  # [M, F]
    return group_gemm(hidden, w_down, group_sizes, **kw)  # [M, D]


def _check_tiling(tiling):
    if tiling is None:
        return TritonTiling()
    if not isinstance(tiling, TritonTiling):
        raise KernelError(f"the pallas_triton backend takes a TritonTiling; got {tiling=}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
