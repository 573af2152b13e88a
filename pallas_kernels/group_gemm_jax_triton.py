"""Grouped GEMM as a hand-written Triton kernel called through jax-triton (GPU only).

Algorithm: the one of :mod:`pallas_kernels.group_gemm_triton`, written in
Triton directly so that Triton's own pipeliner and autotuning knobs apply
without the (deprecated) Pallas Triton lowering in between.  The grid is
``(max_items, cdiv(N, BLOCK_N))`` over the work list of
:mod:`pallas_kernels.work_list`; a program loads its item, runs a
``BLOCK_K`` loop of ``tl.dot`` into a float32 accumulator (two accumulators
and a ``silu(gate) * up`` epilogue in the fused gate/up mode) and stores the
item's rows ``[lo, hi)`` with a masked store; slotless items store zeros and
idle items return at once.

Tiling: :class:`TritonTiling` of :mod:`pallas_kernels.group_gemm_triton`
(``block_m, block_n, block_k, num_warps, num_stages``).

Importing this module never needs triton or jax_triton: both are imported on
first use, and :func:`importable` says whether that will work.  jax-triton
0.3.1 pairs with triton 3.6 (jax-triton 0.4.x needs triton >= 3.7); the
``gpu`` extra of pyproject.toml pins it.  There is no interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import semantics, work_list
from pallas_kernels.group_gemm_triton import TritonTiling


def importable() -> bool:
    """Whether triton and jax_triton import (jax_triton needs a CUDA jaxlib)."""
    try:
        _modules()
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _modules():
    import jax_triton  # noqa: F401  (needs a GPU-enabled jaxlib)
    import triton  # noqa: F401

    return jax_triton, triton


@functools.lru_cache(maxsize=None)
def triton_kernel():
    """The ``@triton.jit`` kernel (built on first use so triton stays optional)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(tile_ptr, lo_ptr, hi_ptr, slot_ptr, lhs_ptr, rhs_ptr, up_ptr, out_ptr,
                M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FUSED: tl.constexpr):
        # lhs [M, K], rhs / up [S, K, N], out [M, N]: row-major, contiguous.
        item = tl.program_id(0)
        n_block = tl.program_id(1)
        lo = tl.load(lo_ptr + item)
        hi = tl.load(hi_ptr + item)
        if lo < hi:
            tile = tl.load(tile_ptr + item)
            slot = tl.load(slot_ptr + item)
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
            cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
            row_mask = (rows >= lo) & (rows < hi)
            col_mask = cols < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if slot >= 0:
                w_offset = slot.to(tl.int64) * K * N
                for k0 in range(0, K, BLOCK_K):
                    k_mask = (k0 + ks) < K
                    a = tl.load(lhs_ptr + rows[:, None].to(tl.int64) * K + (k0 + ks)[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                    w_idx = w_offset + (k0 + ks)[:, None].to(tl.int64) * N + cols[None, :]
                    w_mask = k_mask[:, None] & col_mask[None, :]
                    b = tl.load(rhs_ptr + w_idx, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
                    acc = tl.dot(a, b, acc)
                    if FUSED:
                        u = tl.load(up_ptr + w_idx, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
                        acc_up = tl.dot(a, u, acc_up)
                if FUSED:
                    acc = acc * tl.sigmoid(acc) * acc_up
            out_idx = rows[:, None].to(tl.int64) * N + cols[None, :]
            tl.store(out_ptr + out_idx, acc.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])

    return _kernel


@functools.partial(jax.jit, static_argnames=("tiling",))
def _call(lhs, rhs, up, group_sizes, slots, *, tiling: TritonTiling):
    jax_triton, _ = _modules()
    m, k = lhs.shape
    n = rhs.shape[2]
    items = work_list.build(group_sizes, slots, m, tiling.block_m)
    num_items = items.tile.shape[0]
    fused = up is not None
    return jax_triton.triton_call(
        items.tile, items.lo, items.hi, items.slot, lhs, rhs, up if fused else rhs,
        kernel=triton_kernel(),
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=(num_items, -(-n // tiling.block_n)),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        M=m, K=k, N=n, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        FUSED=fused,
    )


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: TritonTiling | None = None, interpret: bool = False):
    """Grouped GEMM ``[M, K] x [S, K, N] -> [M, N]`` (semantics: :mod:`pallas_kernels.semantics`)."""
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = _check(tiling, interpret)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _call(lhs, rhs, None, group_sizes, slots, tiling=tiling)


def gate_up(x, w_gate, w_up, group_sizes, *, group_offset=0, slot_of_expert=None,
            tiling: TritonTiling | None = None, interpret: bool = False):
    """Fused ``silu(x @ w_gate[s]) * (x @ w_up[s])``: [M, D] x 2 [S, D, F] -> [M, F] in x.dtype."""
    semantics.check_group_gemm_args(x, w_gate, group_sizes, group_offset, slot_of_expert)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise ValueError(f"w_up must match w_gate; got {w_gate.shape=} {w_up.shape=} {w_up.dtype=}")
    tiling = _check(tiling, interpret)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _call(x, w_gate, w_up, group_sizes, slots, tiling=tiling)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: TritonTiling | None = None, interpret: bool = False):
    """Expert FFN: the fused gate/up kernel, then the grouped down projection."""
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    kw = dict(group_offset=group_offset, slot_of_expert=slot_of_expert, tiling=tiling, interpret=interpret)
    hidden = gate_up(x, w_gate, w_up, group_sizes, **kw)  # [M, F]
    return group_gemm(hidden, w_down, group_sizes, **kw)  # [M, D]


def _check(tiling, interpret):
    if interpret:
        raise ValueError("the jax_triton backend has no interpret mode; use pallas_triton with interpret=True")
    if tiling is None:
        tiling = TritonTiling()
    if not isinstance(tiling, TritonTiling):
        raise ValueError(f"the jax_triton backend takes a TritonTiling; got {tiling=}")
    if not importable():
        raise ValueError("the jax_triton backend needs triton and jax_triton with a CUDA jaxlib "
                         "(pip install 'epsjax[gpu]'); they do not import here")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
