"""Grouped GEMM as a Pallas Mosaic GPU kernel for Hopper (wgmma, TMA, persistent).

Algorithm.  The work items of :mod:`pallas_kernels.work_list` (one aligned
``block_m`` row tile x one group segment) times the ``N / block_n`` column
blocks form a static list of output tiles.  A persistent grid of ``num_sms``
thread blocks walks that list (``plgpu.nd_loop`` over the ``"sm"`` axis, tile
``i`` goes to block ``i mod num_sms``), so ``num_sms`` below the device's SM
count leaves SMs free for communication kernels, as EPS-MoE does.  For each
tile:

* the K loop is a software pipeline (``plgpu.emit_pipeline``) of
  ``max_concurrent_steps`` stages: TMA copies ``lhs[tile rows, k block]`` and
  ``rhs[slot, k block, n block]`` into swizzled shared memory while the
  previous stages feed ``wgmma`` into a float32 register accumulator;
* the epilogue casts the accumulator into shared memory and TMA-stores only the
  rows ``[lo, hi)`` of the item.  TMA stores need static shapes, so the row
  count is written as a sum of powers of two, one store per set bit (at most
  ``log2(block_m) + 1`` stores; no other group's rows are touched);
* items without a slot store zeros (no loads, no wgmma); idle items past the
  traced item count do nothing.

Rows of a tile that belong to other groups are multiplied too (wgmma has no
row mask), the usual price of aligned tiles; TMA zero-fills rows past M.

The fused gate/up mode runs two accumulators over the same lhs stages and
writes ``silu(gate) * up``; the expert FFN then runs the down projection.

Tile order: ``grid_band = 0`` walks the tiles N-fastest (a wave of blocks shares one row tile and reads as many
weight blocks as there are blocks); ``grid_band = b`` walks a planar snake (``plgpu.planar_snake``, as jax's
ragged_dot_mgpu does) over bands of ``b`` N-blocks, M-minor, so a wave reads ``b`` weight blocks per expert and
L2 serves the rest. Which is faster is for the GPU sweep to say (the selector reads it from the table).

Tiling: ``block_m`` (multiple of 64, one warpgroup wgmma M), ``block_n``
(multiple of 64, <= 256), ``block_k`` (``block_k * itemsize`` = 128 bytes: 64
for 16-bit types), ``max_concurrent_steps`` (pipeline depth), ``num_sms``
(persistent grid size; None = every SM of the device); stages that do not
fit the 227 KiB of shared memory are dropped (the fused gate/up mode holds
two weight tiles per stage).

Resources (:func:`resources`, checked by :func:`check_tiling`): one
128-thread warpgroup holds every float32 accumulator, ``block_m * block_n /
128`` registers per thread per weight matrix.  Above
:data:`ACCUMULATOR_REGISTER_BUDGET` of them ptxas runs out of the 255
registers a thread may have: compiled for sm_90a it spills and serializes
wgmma (measured with ``scripts/aot_check.py``: 128x128 fused gate/up, 255
registers and 896 bytes spilled; 128x256 plain, 1168 bytes), so such tilings
are refused.  The fused gate/up kernel's default is therefore 128x64 (two
128x64 accumulators), the plain kernel's 128x128.  Requires 16-bit
inputs (float16 / bfloat16) and ``K % block_k == N % block_n == 0``; M is padded to
a multiple of 8 (the TMA row tiling) when it is not one.

On CPU it runs in Mosaic GPU interpret mode (``interpret=True`` is turned into
``plgpu.InterpretGPUParams()``), which simulates shared memory, TMA and
barriers; the compiled path needs an sm_90 GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import semantics, targets, work_list

_SWIZZLE_BYTES = 128
MAX_SMEM_BYTES = 232448  # sm_90 dynamic shared memory per block (227 KiB)
WARPGROUP_THREADS = 128
# float32 accumulator registers per thread that leave ptxas room for addresses, the pipeline's barriers and
# the epilogue (sm_90a, 255 registers per thread). Compiled for H100 at Mixtral-like shapes: 192 of them built
# without spills (fused 64x192: 255 registers used; plain 128x192: 218), and every tiling with 256 spilled
# (fused 128x128, 64x256; plain 128x256, 256x128) and serialized wgmma.
ACCUMULATOR_REGISTER_BUDGET = 192


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Tile sizes, pipeline depth and persistent grid size."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    num_sms: int | None = None
    grid_band: int = 0  # 0: walk the tiles N-fastest; b > 0: a planar snake over bands of b N-blocks (M-minor)

    def __post_init__(self):
        if not isinstance(self.block_m, int) or self.block_m % 64 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MosaicTiling.block_m must be a power of two and a multiple of 64; got {self.block_m=}")
        if not isinstance(self.block_n, int) or self.block_n % 64 or not 64 <= self.block_n <= 256:
            raise ValueError(f"MosaicTiling.block_n must be 64, 128, 192 or 256; got {self.block_n=}")
        if not isinstance(self.block_k, int) or self.block_k < 8 or self.block_k & (self.block_k - 1):
            raise ValueError(f"MosaicTiling.block_k must be a power of two >= 8; got {self.block_k=}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 1:
            raise ValueError(f"MosaicTiling.max_concurrent_steps must be >= 1; got {self.max_concurrent_steps=}")
        if self.num_sms is not None and (not isinstance(self.num_sms, int) or self.num_sms < 1):
            raise ValueError(f"MosaicTiling.num_sms must be None or >= 1; got {self.num_sms=}")
        if not isinstance(self.grid_band, int) or self.grid_band < 0:
            raise ValueError(f"MosaicTiling.grid_band must be an int >= 0; got {self.grid_band=}")


def _kernel(tile_gmem, lo_gmem, hi_gmem, slot_gmem, lhs_gmem, *refs,
            tiling: MosaicTiling, fused: bool, num_items: int):
    """The persistent body, run by every block of the ``"sm"`` grid.

    tile_gmem, lo_gmem, hi_gmem, slot_gmem: [W] int32 work list.
    lhs_gmem: [M, K].  refs: rhs_gmem [S, K, N] (and up_gmem when fused), out_gmem [M, N].
    """
    *w_gmems, out_gmem = refs
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    k = lhs_gmem.shape[1]
    n = out_gmem.shape[1]
    grid_n = n // bn
    swizzle_elems = _SWIZZLE_BYTES // jnp.dtype(lhs_gmem.dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))

    @plgpu.nd_loop((num_items * grid_n,), collective_axes="sm")
    def _tile_loop(info: plgpu.NDLoopInfo):
        (linear,) = info.index
        if tiling.grid_band:
            # L2 reuse: consecutive tiles (the blocks of one wave) take the same few weight blocks (a band of
            # grid_band N-blocks) over successive row tiles, which mostly belong to the same expert.
            item, n_block = plgpu.planar_snake(linear, (num_items, grid_n), 1, tiling.grid_band)
        else:
            item = linear // grid_n
            n_block = linear % grid_n
        tile = tile_gmem[item]
        lo = lo_gmem[item]
        hi = hi_gmem[item]
        slot = slot_gmem[item]
        row0 = tile * bm

        def product():
            # With two or more stages, a stage's buffers are released one step late, so
            # the wgmma reading them may still run while the next one is issued.
            delay = 1 if tiling.max_concurrent_steps > 1 else 0

            def acc_scope(*acc_refs):  # each [block_m, block_n] float32
                def k_step(_, lhs_smem, *w_smems):  # [block_m, block_k], [block_k, block_n] ...
                    for acc_ref, w_smem in zip(acc_refs, w_smems):
                        plgpu.wgmma(acc_ref, lhs_smem, w_smem)
                    plgpu.wgmma_wait(delay * len(w_smems))  # the previous step's wgmmas are done

                plgpu.emit_pipeline(
                    k_step,
                    grid=(k // bk,),
                    in_specs=[
                        plgpu.BlockSpec((bm, bk), lambda kb: (tile, kb), transforms=transforms,
                                        delay_release=delay),
                        *[plgpu.BlockSpec((bk, bn), lambda kb: (kb, n_block), transforms=transforms,
                                          delay_release=delay)
                          for _ in w_gmems],
                    ],
                    max_concurrent_steps=tiling.max_concurrent_steps,
                )(lhs_gmem, *[w.at[slot] for w in w_gmems])
                return tuple(acc_ref[...] for acc_ref in acc_refs)

            accs = pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn), jnp.float32) for _ in w_gmems])
            if fused:
                gate, up = accs
                return semantics.silu(gate) * up
            return accs[0]

        @pl.when((lo < hi) & (slot >= 0))
        def _():
            _store_rows(product().astype(out_gmem.dtype), out_gmem, row0, lo, hi, n_block, bm, bn)

        @pl.when((lo < hi) & (slot < 0))
        def _():
            _store_rows(jnp.zeros((bm, bn), out_gmem.dtype), out_gmem, row0, lo, hi, n_block, bm, bn)

    plgpu.wait_smem_to_gmem(0)


def _store_rows(value, out_gmem, row0, lo, hi, n_block, bm: int, bn: int):
    """TMA-stores rows ``[lo, hi)`` of the tile ``value [block_m, block_n]`` at row0."""

    def scope(o_smem):  # [block_m, block_n]
        o_smem[...] = value
        plgpu.commit_smem()
        count = hi - lo
        start = lo - row0
        size = bm
        while size >= 1:  # one TMA store per set bit of count, largest first
            @pl.when(count & size != 0)
            def _(size=size, start=start):
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(start, size)],
                    out_gmem.at[pl.ds(row0 + start, size), pl.ds(n_block * bn, bn)])

            start = start + (count & size)
            size //= 2
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, plgpu.SMEM((bm, bn), out_gmem.dtype))


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one thread block of the kernel holds (a static estimate, checked against ptxas by the AOT check)."""

    accumulator_registers: int  # float32 accumulator registers per thread (one warpgroup holds them all)
    smem_bytes: int             # shared memory: pipeline stages, epilogue tile, barriers
    stages: int                 # pipeline stages after dropping those that do not fit shared memory

    @property
    def fits_registers(self) -> bool:
        return self.accumulator_registers <= ACCUMULATOR_REGISTER_BUDGET


def resources(tiling: MosaicTiling, itemsize: int, num_weights: int = 1) -> Resources:
    """The resource model of ``tiling`` for ``num_weights`` weight matrices (2 = fused gate/up)."""
    accumulators = num_weights * tiling.block_m * tiling.block_n // WARPGROUP_THREADS
    fitted = fit_stages(tiling, itemsize, num_weights)
    return Resources(accumulators, smem_bytes(fitted, itemsize, num_weights), fitted.max_concurrent_steps)


def default_tiling(num_weights: int = 1) -> MosaicTiling:
    """128x128 for one weight matrix; 128x64 for the fused gate/up kernel (two accumulators in registers)."""
    return MosaicTiling() if num_weights == 1 else MosaicTiling(block_n=64)


def smem_bytes(tiling: MosaicTiling, itemsize: int, num_weights: int = 1) -> int:
    """Shared memory of the kernel: pipeline stages, the epilogue tile, barriers (estimate)."""
    stage = (tiling.block_m * tiling.block_k + num_weights * tiling.block_k * tiling.block_n) * itemsize
    epilogue = tiling.block_m * tiling.block_n * itemsize
    return tiling.max_concurrent_steps * stage + epilogue + 64 * tiling.max_concurrent_steps


def fit_stages(tiling: MosaicTiling, itemsize: int, num_weights: int) -> MosaicTiling:
    """``tiling`` with max_concurrent_steps lowered until the kernel fits shared memory."""
    while smem_bytes(tiling, itemsize, num_weights) > MAX_SMEM_BYTES:
        if tiling.max_concurrent_steps == 1:
            raise ValueError(f"MosaicTiling does not fit shared memory even with one stage: {tiling=} "
                             f"needs {smem_bytes(tiling, itemsize, num_weights)} > {MAX_SMEM_BYTES} bytes")
        tiling = dataclasses.replace(tiling, max_concurrent_steps=tiling.max_concurrent_steps - 1)
    return tiling


def _num_sms(tiling: MosaicTiling) -> int:
    if tiling.num_sms is not None:
        return tiling.num_sms
    return targets.current().num_cores or 132


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def _call(lhs, rhs_list, group_sizes, slots, *, tiling: MosaicTiling, interpret: bool):
    m = lhs.shape[0]
    n = rhs_list[0].shape[2]
    m_pad = -(-m // 8) * 8  # TMA tiles GMEM rows by 8; the pad rows are padding (zeros)
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0))) if m_pad != m else lhs
    tiling = fit_stages(tiling, jnp.dtype(lhs.dtype).itemsize, len(rhs_list))
    items = work_list.build(group_sizes, slots, m_pad, tiling.block_m)
    num_items = items.tile.shape[0]
    fused = len(rhs_list) == 2
    body = functools.partial(_kernel, tiling=tiling, fused=fused, num_items=num_items)
    body.__name__ = "gate_up" if fused else "group_gemm"  # Mosaic names the kernel (and ptxas reports) by it
    kernel = plgpu.kernel(
        body,
        out_type=semantics.out_struct((m_pad, n), lhs.dtype, lhs, *rhs_list, items),
        grid=(_num_sms(tiling),),
        grid_names=("sm",),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out = kernel(items.tile, items.lo, items.hi, items.slot, lhs, *rhs_list)
    return out[:m] if m_pad != m else out


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: MosaicTiling | None = None, interpret: bool = False):
    """Grouped GEMM ``[M, K] x [S, K, N] -> [M, N]`` (semantics: :mod:`pallas_kernels.semantics`)."""
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = check_tiling(tiling, lhs.dtype, rhs.shape[1], rhs.shape[2], num_weights=1)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _call(lhs, (rhs,), group_sizes, slots, tiling=tiling, interpret=interpret)


def gate_up(x, w_gate, w_up, group_sizes, *, group_offset=0, slot_of_expert=None,
            tiling: MosaicTiling | None = None, interpret: bool = False):
    """Fused ``silu(x @ w_gate[s]) * (x @ w_up[s])``: [M, D] x 2 [S, D, F] -> [M, F] in x.dtype."""
    semantics.check_group_gemm_args(x, w_gate, group_sizes, group_offset, slot_of_expert)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise ValueError(f"w_up must match w_gate; got {w_gate.shape=} {w_up.shape=} {w_up.dtype=}")
    tiling = check_tiling(tiling, x.dtype, w_gate.shape[1], w_gate.shape[2], num_weights=2)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _call(x, (w_gate, w_up), group_sizes, slots, tiling=tiling, interpret=interpret)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: MosaicTiling | None = None, interpret: bool = False):
    """Expert FFN: the fused gate/up kernel, then the grouped down projection. ``tiling=None`` gives each its
    default (:func:`default_tiling`); a tiling given applies to both and must fit the fused kernel."""
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    kw = dict(group_offset=group_offset, slot_of_expert=slot_of_expert, tiling=tiling, interpret=interpret)
    hidden = gate_up(x, w_gate, w_up, group_sizes, **kw)  # [M, F]
    return group_gemm(hidden, w_down, group_sizes, **kw)  # [M, D]


def supports(dtype, k: int, n: int, tiling: MosaicTiling | None = None, op: str = "group_gemm") -> bool:
    """Whether the kernel takes these operands (16-bit dtype, K and N divisible by the tiles, accumulators
    within the register budget). For ``op="expert_ffn"`` (k = D, n = F) both of its kernels must."""
    try:
        if op == "expert_ffn":
            check_tiling(tiling, dtype, k, n, num_weights=2)  # gate/up: [M, D] x [D, F]
            check_tiling(tiling, dtype, n, k, num_weights=1)  # down: [M, F] x [F, D]
        else:
            check_tiling(tiling, dtype, k, n, num_weights=1)
    except ValueError:
        return False
    return True


def check_tiling(tiling, dtype, k: int, n: int, num_weights: int = 1) -> MosaicTiling:
    """The tiling to run (the default for ``num_weights`` when None); ValueError, naming the limit, when the
    kernel cannot take it."""
    tiling = default_tiling(num_weights) if tiling is None else tiling
    if not isinstance(tiling, MosaicTiling):
        raise ValueError(f"the mosaic_gpu backend takes a MosaicTiling; got {tiling=}")
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize != 2:
        raise ValueError(f"the mosaic_gpu backend needs float16 or bfloat16 operands; got {dtype=}")
    if tiling.block_k * itemsize != _SWIZZLE_BYTES:
        raise ValueError(f"MosaicTiling.block_k * itemsize must be {_SWIZZLE_BYTES} bytes; got {tiling.block_k=} {dtype=}")
    if k % tiling.block_k or n % tiling.block_n:
        raise ValueError(f"the mosaic_gpu backend needs K % block_k == N % block_n == 0; got {k=} {n=} {tiling=}")
    regs = resources(tiling, itemsize, num_weights).accumulator_registers
    if regs > ACCUMULATOR_REGISTER_BUDGET:
        kind = "the fused gate/up kernel (two accumulators)" if num_weights == 2 else "the kernel"
        raise ValueError(f"{tiling} needs {regs} float32 accumulator registers per thread in {kind}, over the "
                         f"budget of {ACCUMULATOR_REGISTER_BUDGET} (block_m * block_n * weights / 128; above it "
                         f"ptxas spills and serializes wgmma); e.g. {default_tiling(num_weights)}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
