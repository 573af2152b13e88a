"""The jax-triton backend's Triton kernel, in a module that imports neither jax nor (until called) triton.

One program per (work item, column block) of :mod:`pallas_kernels.work_list`: it loads its item
``(tile, lo, hi, slot)``, runs a ``BLOCK_K`` loop of ``tl.dot`` into a float32 accumulator (two accumulators
and a ``silu(gate) * up`` epilogue in the fused gate/up mode) and stores the item's rows ``[lo, hi)``;
slotless items store zeros, idle items (``lo >= hi``) store nothing.

Register budget (sm_90a, measured by ``scripts/aot_check.py``): 64-bit arithmetic stays in the scalar bases
and the tile offsets are 32-bit; rows past M are clamped and columns past N wrap instead of being masked, so
the loads need no mask and Triton sees 16-byte contiguous runs. With 64-bit address tensors and masked loads
the fused kernel spilled at every swept tiling.

Without jax, the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on torch CPU tensors:
``scripts/check_triton_interpret.py``.
"""

from __future__ import annotations

import functools


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
        slot = tl.load(slot_ptr + item)
        row0 = tl.load(tile_ptr + item) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        # One straight K loop (no branch around it, so Triton's pipeliner takes it): idle items (lo >= hi) and
        # slotless items run zero steps; an idle item's store mask is empty, a slotless one stores zeros.
        # Rows past M are clamped to the last one and columns past N wrap around instead of being masked (their
        # products are never stored), so the loads need no mask (a clamp would hide the columns' contiguity
        # from Triton, which then loads element by element and runs out of registers); 64-bit arithmetic stays in the scalar bases and the
        # [BLOCK, BLOCK] offsets are 32-bit (one expert's K x N and one tile's rows x K are < 2^31 elements).
        steps = tl.where((lo < hi) & (slot >= 0), tl.cdiv(K, BLOCK_K), 0)
        w_base = tl.maximum(slot, 0).to(tl.int64) * K * N
        tile_rows = tl.minimum(rows, M - 1) - row0  # [BLOCK_M]
        a_ptrs = lhs_ptr + row0.to(tl.int64) * K + (tile_rows[:, None] * K + ks[None, :])  # [BLOCK_M, BLOCK_K]
        w_cols = cols % N  # columns past N wrap around (never stored)
        if N % 8 == 0:  # runs of 8 stay contiguous across the wrap: tell Triton, so it loads 16-byte vectors
            w_cols = tl.max_contiguous(tl.multiple_of(w_cols, 8), 8)
        w_offsets = ks[:, None] * N + w_cols[None, :]  # [BLOCK_K, BLOCK_N]
        b_ptrs = rhs_ptr + w_base + w_offsets
        u_ptrs = up_ptr + w_base + w_offsets
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, steps):
            if K % BLOCK_K == 0:
                a = tl.load(a_ptrs)  # [BLOCK_M, BLOCK_K]
                b = tl.load(b_ptrs)  # [BLOCK_K, BLOCK_N]
            else:
                k_mask = (step * BLOCK_K + ks) < K
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            if FUSED:
                if K % BLOCK_K == 0:
                    u = tl.load(u_ptrs)  # [BLOCK_K, BLOCK_N]
                else:
                    u = tl.load(u_ptrs, mask=((step * BLOCK_K + ks) < K)[:, None], other=0.0)
                acc_up = tl.dot(a, u, acc_up)
                u_ptrs += BLOCK_K * N
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * N
        if FUSED:
            acc = acc * tl.sigmoid(acc) * acc_up
        out_ptrs = out_ptr + row0.to(tl.int64) * N + (tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :])
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=((rows >= lo) & (rows < hi))[:, None] & (cols < N)[None, :])

    return _kernel
