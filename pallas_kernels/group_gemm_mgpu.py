"""Grouped GEMM as a Pallas Mosaic GPU kernel for Hopper (wgmma, TMA, warp-specialized, persistent).

Algorithm.  The work items of :mod:`pallas_kernels.work_list` (one aligned ``block_m`` row tile x one group
segment) times the ``N / block_n`` column blocks form a static list of output tiles.  A persistent grid of
``num_sms`` thread blocks walks that list (``plgpu.nd_loop`` over the ``"sm"`` axis, tile ``i`` goes to block
``i mod num_sms``), so ``num_sms`` below the device's SM count leaves SMs free for communication kernels, as
EPS-MoE does.  Each block is warp-specialized, the structure of jax's ``hopper_matmul_mgpu.py``:

* one producer warpgroup (``PRODUCER_REGISTERS`` registers per thread) issues the TMA loads of
  ``lhs[tile rows, k block]`` and ``rhs[slot, k block, n block]`` into ``max_concurrent_steps`` swizzled
  shared-memory stages (``plgpu.emit_pipeline_warp_specialized``);
* ``consumers`` (1 or 2) compute warpgroups each own ``block_n / consumers`` of the block's columns and issue
  ``wgmma`` into their float32 register accumulators; with two, one consumer's wgmma runs while the other
  waits, so each may wait for its own every step and the stage is released at once;
* the epilogue writes each consumer's tile in 64-column chunks through two shared-memory buffers per consumer
  and TMA-stores only the rows ``[lo, hi)`` of the item, one bulk group per chunk: a chunk is written while
  the previous chunk's stores run, and the last stores of a tile run during the next tile's K loop (the wait
  comes before the buffer is reused, not after the store).  TMA stores need static shapes, so the row count is
  written as a sum of powers of two, one store per set bit (no other group's rows are touched); the buffers
  are unswizzled because those stores start at any row;
* items without a slot store zeros (no loads, no wgmma); idle items past the traced item count do nothing.

Rows of a tile that belong to other groups are multiplied too (wgmma has no row mask), the usual price of
aligned tiles; TMA zero-fills rows past M.

The fused gate/up mode runs two accumulators per consumer over the same lhs stages and writes
``silu(gate) * up``; the expert FFN then runs the down projection.

Tile order: ``grid_band = 0`` walks the tiles N-fastest (a wave of blocks shares one row tile and reads as many
weight blocks as there are blocks); ``grid_band = b`` walks a planar snake (``plgpu.planar_snake``, as jax's
ragged_dot_mgpu does) over bands of ``b`` N-blocks, M-minor, so a wave reads ``b`` weight blocks per expert and
L2 serves the rest. Which is faster is for the GPU sweep to say (the selector reads it from the table).

Tiling (:class:`MosaicTiling`): ``block_m`` (multiple of 64, the wgmma M), ``block_n`` (``consumers`` x a
multiple of 64, <= 256), ``block_k`` (64 or 128 for 16-bit types: one or two 128-byte swizzled column tiles),
``max_concurrent_steps`` (stages), ``consumers``, ``num_sms`` (persistent grid size; None = every SM of the
device), ``grid_band``.  Stages that do not fit the 227 KiB of shared memory are dropped; a tiling left with
one stage is refused.  Defaults: 128x256 for one weight matrix, 128x128 for the fused gate/up kernel (128
accumulator registers per consumer thread either way), and one consumer of 128x64 where N is not a multiple
of 128.

Resources (:func:`resources`, checked by :func:`check_tiling`): a consumer thread holds ``block_m * block_n /
consumers / 128`` float32 accumulator registers per weight matrix, and may use :func:`consumer_registers` in
all (232 with two consumers, 248 with one).  Compiled for sm_90a (``scripts/aot_check.py``, Mixtral shapes),
every tiling with 128 accumulator registers per consumer built without spills; 192 (one consumer) and 256
(fused 128x256 or 256x128, plain 256x256) spilled and, at 256, serialized wgmma.  So accumulators are held to
:func:`accumulator_budget` (consumer registers less ``ACCUMULATOR_HEADROOM``).  Requires 16-bit inputs
(float16 / bfloat16) and ``K % block_k == N % block_n == 0``; M is padded to a multiple of 8 (the TMA row
tiling) when it is not one.

On CPU it runs in Mosaic GPU interpret mode (``interpret=True`` is turned into ``plgpu.InterpretGPUParams()``),
which simulates every warpgroup, shared memory, TMA and barriers; the compiled path needs an sm_90 GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from epsjax.pallas_kernels import semantics, targets, work_list
from epsjax.pallas_kernels.errors import KernelError

_SWIZZLE_BYTES = 128
MAX_SMEM_BYTES = 232448  # sm_90 dynamic shared memory per block (227 KiB)
WARPGROUP_THREADS = 128
FP8 = jnp.float8_e4m3fn
EPILOGUE_N = 64  # columns per epilogue chunk (one 128-byte row of 16-bit values)
PRODUCER_REGISTERS = 40  # registers per thread left to the TMA warpgroup (as jax's Hopper matmul)
# Registers per consumer thread beyond its float32 accumulators that ptxas needs for addresses, the
# pipeline's barriers and the epilogue (provisional, set from the sm_90a builds of scripts/aot_check.py).
ACCUMULATOR_HEADROOM = 64


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Block tile, pipeline depth, warpgroup split, persistent grid size and tile order.

    The block computes a ``block_m x block_n`` output tile; each of its ``consumers`` compute warpgroups holds
    ``block_m x block_n / consumers`` of it (split along N), fed by one producer warpgroup issuing TMA.
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    max_concurrent_steps: int = 4
    num_sms: int | None = None
    grid_band: int = 0  # 0: walk the tiles N-fastest; b > 0: a planar snake over bands of b N-blocks (M-minor)
    consumers: int = 2  # compute warpgroups (1 or 2), besides the producer

    def __post_init__(self):
        if not isinstance(self.consumers, int) or self.consumers not in (1, 2):
            raise KernelError(f"MosaicTiling.consumers must be 1 or 2 compute warpgroups; got {self.consumers=}")
        if not isinstance(self.block_m, int) or self.block_m % 64 or self.block_m & (self.block_m - 1):
            raise KernelError(f"MosaicTiling.block_m must be a power of two and a multiple of 64; got {self.block_m=}")
        step = EPILOGUE_N * self.consumers  # each consumer's columns are whole 64-column epilogue chunks
        if not isinstance(self.block_n, int) or self.block_n % step or not step <= self.block_n <= 256:
            raise KernelError(f"MosaicTiling.block_n must be a multiple of {step} in [{step}, 256] with "
                              f"{self.consumers} consumer warpgroup(s); got {self.block_n=}")
        if not isinstance(self.block_k, int) or self.block_k < 8 or self.block_k & (self.block_k - 1):
            raise KernelError(f"MosaicTiling.block_k must be a power of two >= 8; got {self.block_k=}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 1:
            raise KernelError(f"MosaicTiling.max_concurrent_steps must be >= 1; got {self.max_concurrent_steps=}")
        if self.num_sms is not None and (not isinstance(self.num_sms, int) or self.num_sms < 1):
            raise KernelError(f"MosaicTiling.num_sms must be None or >= 1; got {self.num_sms=}")
        if not isinstance(self.grid_band, int) or self.grid_band < 0:
            raise KernelError(f"MosaicTiling.grid_band must be an int >= 0; got {self.grid_band=}")

    @property
    def consumer_n(self) -> int:
        """Output columns (and accumulator columns) per consumer warpgroup."""
        return self.block_n // self.consumers


def _kernel(tile_gmem, lo_gmem, hi_gmem, slot_gmem, lhs_gmem, *refs,
            tiling: MosaicTiling, fused: bool, num_items: int, fp8: bool):
    """The persistent body, run by every warpgroup of every block of the ``"sm"`` grid.

    tile_gmem, lo_gmem, hi_gmem, slot_gmem: [W] int32 work list.  lhs_gmem: [M, K].
    refs: rhs_gmem [S, K, N] (and up_gmem when fused), out_gmem [M, N]; with ``fp8``: lhs_scale_gmem [M], then
    the e4m3 weights K-major [S, N, K] and their scales [S, N] (one pair per weight), out_gmem [M, N].
    """
    if fp8:
        lhs_scale_gmem, *rest, out_gmem = refs
        w_gmems, w_scale_gmems = rest[:len(rest) // 2], rest[len(rest) // 2:]
    else:
        *w_gmems, out_gmem = refs
    num_weights = len(w_gmems)
    bm, bn, bk, cn = tiling.block_m, tiling.block_n, tiling.block_k, tiling.consumer_n
    k = lhs_gmem.shape[1]
    grid_n = out_gmem.shape[1] // bn
    chunks = cn // EPILOGUE_N  # epilogue chunks per consumer and tile
    swizzle_elems = _SWIZZLE_BYTES // jnp.dtype(lhs_gmem.dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))
    # 8-bit wgmma reads both operands K-major: the weights arrive as [S, N, K] and are read transposed.
    w_block = (bn, bk) if fp8 else (bk, bn)

    def pipeline(body, compute_context, tile=0, n_block=0):
        w_index = (lambda kb: (n_block, kb)) if fp8 else (lambda kb: (kb, n_block))
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // bk,),
            memory_registers=PRODUCER_REGISTERS,
            in_specs=[plgpu.BlockSpec((bm, bk), lambda kb: (tile, kb), transforms=transforms),
                      *[plgpu.BlockSpec(w_block, w_index, transforms=transforms) for _ in w_gmems]],
            wg_axis="wg",
            num_compute_wgs=tiling.consumers,
            max_concurrent_steps=tiling.max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the body)
    scratch = dict(
        allocations=pipeline(ignore, ignore).get_allocations(lhs_gmem, *[w.at[0] for w in w_gmems]),
        # [slot, consumer, rows, 64]: two epilogue buffers per consumer, so a chunk's TMA stores run while
        # the next chunk is written, and the last ones while the next tile's K loop runs.
        out_smem=plgpu.SMEM((2, tiling.consumers, bm, EPILOGUE_N), out_gmem.dtype),
    )
    if fp8:  # each consumer's row scales and column scales (per weight), fetched by TMA for the epilogue
        scratch.update(row_scale_smem=plgpu.SMEM((tiling.consumers, bm), jnp.float32),
                       col_scale_smem=plgpu.SMEM((tiling.consumers, num_weights, cn), jnp.float32),
                       scale_barrier=plgpu.Barrier(num_arrivals=1 + num_weights, num_barriers=tiling.consumers))

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocations, out_smem, row_scale_smem=None, col_scale_smem=None, scale_barrier=None):
        wg = lax.axis_index("wg")  # consumers 0..consumers-1, then the producer

        @plgpu.nd_loop((num_items * grid_n,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (linear,) = info.index
            if tiling.grid_band:
                # L2 reuse: consecutive tiles (the blocks of one wave) take the same few weight blocks (a band
                # of grid_band N-blocks) over successive row tiles, which mostly belong to the same expert.
                item, n_block = plgpu.planar_snake(linear, (num_items, grid_n), 1, tiling.grid_band)
            else:
                item = linear // grid_n
                n_block = linear % grid_n
            tile, lo, hi, slot = tile_gmem[item], lo_gmem[item], hi_gmem[item], slot_gmem[item]
            cols = pl.ds(wg * cn, cn)  # this consumer's columns of the block's weight tiles
            col0 = n_block * bn + wg * cn

            def store(value):  # [block_m, consumer_n] -> rows [lo, hi) of this consumer's columns
                for c in range(chunks):
                    buf = out_smem.at[(info.local_index * chunks + c) % 2, wg]
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the chunk two back has left buf
                    buf[...] = value[:, c * EPILOGUE_N:(c + 1) * EPILOGUE_N]
                    plgpu.commit_smem()
                    _store_rows(buf, out_gmem, tile * bm, lo, hi, col0 + c * EPILOGUE_N, bm)

            def scaled(accs):  # fp8: acc * row scale * column scale, per weight
                barrier = scale_barrier.at[wg]
                plgpu.copy_gmem_to_smem(lhs_scale_gmem.at[pl.ds(tile * bm, bm)], row_scale_smem.at[wg], barrier)
                for i, w_scale in enumerate(w_scale_gmems):
                    plgpu.copy_gmem_to_smem(w_scale.at[slot, pl.ds(col0, cn)], col_scale_smem.at[wg, i], barrier)
                plgpu.barrier_wait(barrier)
                rows = plgpu.load(row_scale_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                return [acc * rows[:, None]
                        * plgpu.load(col_scale_smem.at[wg, i], layout=plgpu.Layout.WGMMA.reduce(0))[None, :]
                        for i, acc in enumerate(accs)]

            def compute_context(eval_pipeline):
                def acc_scope(*acc_refs):  # each [block_m, consumer_n] float32
                    eval_pipeline(acc_refs)
                    accs = [acc_ref[...] for acc_ref in acc_refs]
                    if fp8:
                        accs = scaled(accs)
                    value = semantics.silu(accs[0]) * accs[1] if fused else accs[0]
                    store(value.astype(out_gmem.dtype))

                pl.run_scoped(acc_scope, *[plgpu.ACC((bm, cn), jnp.float32) for _ in w_gmems])

            def k_step(_, lhs_smem, *w_smems_and_accs):  # [block_m, block_k], weight blocks ..., accs
                *w_smems, acc_refs = w_smems_and_accs
                for acc_ref, w_smem in zip(acc_refs, w_smems):
                    plgpu.wgmma(acc_ref, lhs_smem, w_smem.at[cols].T if fp8 else w_smem.at[:, cols])
                plgpu.wgmma_wait(0)  # the stage is released after this step; the other consumer keeps wgmma busy
                return acc_refs

            @pl.when((lo < hi) & (slot >= 0))
            def _():
                pipeline(k_step, compute_context, tile, n_block)(
                    lhs_gmem, *[w.at[slot] for w in w_gmems], allocations=allocations)

            @pl.when((lo < hi) & (slot < 0) & (wg < tiling.consumers))
            def _():  # a group without a local expert: zeros, no loads
                store(jnp.zeros((bm, cn), out_gmem.dtype))

    plgpu.wait_smem_to_gmem(0)


def _store_rows(buf, out_gmem, row0, lo, hi, col0, bm: int):
    """TMA-stores rows ``[lo, hi)`` of the chunk ``buf [block_m, 64]`` (holding rows row0..) at column col0,
    as one bulk group. TMA stores need static shapes, so the row count is a sum of powers of two, one store
    per set bit, largest first; the buffer is unswizzled because those stores start at any row."""
    count = hi - lo
    start = lo - row0
    size = bm
    while size >= 1:
        @pl.when(count & size != 0)
        def _(size=size, start=start):
            plgpu.copy_smem_to_gmem(buf.at[pl.ds(start, size)],
                                    out_gmem.at[pl.ds(row0 + start, size), pl.ds(col0, EPILOGUE_N)],
                                    commit_group=False)

        start = start + (count & size)
        size //= 2
    plgpu.commit_smem_to_gmem_group()


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one thread block of the kernel holds (a static estimate, checked against ptxas by the AOT check)."""

    accumulator_registers: int  # float32 accumulator registers per consumer thread
    smem_bytes: int             # shared memory: pipeline stages, epilogue buffers, barriers
    stages: int                 # pipeline stages after dropping those that do not fit shared memory
    accumulator_budget: int     # accumulator registers a consumer thread may hold without spilling

    @property
    def fits_registers(self) -> bool:
        return self.accumulator_registers <= self.accumulator_budget


def resources(tiling: MosaicTiling, itemsize: int, num_weights: int = 1) -> Resources:
    """The resource model of ``tiling`` for ``num_weights`` weight matrices (2 = fused gate/up)."""
    accumulators = num_weights * tiling.block_m * tiling.consumer_n // WARPGROUP_THREADS
    fitted = fit_stages(tiling, itemsize, num_weights)
    return Resources(accumulators, smem_bytes(fitted, itemsize, num_weights), fitted.max_concurrent_steps,
                     accumulator_budget(tiling.consumers))


def consumer_registers(consumers: int) -> int:
    """Registers per thread of a consumer warpgroup: the 512 per thread of one warpgroup's share of the
    register file, less the producer's, split over the consumers, capped at 255, rounded down to 8 (the
    pipeline's setmaxnreg)."""
    return min(255, (512 - PRODUCER_REGISTERS) // consumers) // 8 * 8


def accumulator_budget(consumers: int) -> int:
    """float32 accumulator registers per consumer thread that leave ptxas room for addresses, barriers and the
    epilogue (see :data:`ACCUMULATOR_HEADROOM`)."""
    return consumer_registers(consumers) - ACCUMULATOR_HEADROOM


def default_tiling(num_weights: int = 1, n: int | None = None, itemsize: int = 2) -> MosaicTiling:
    """128x256 blocks (two consumers of 128x128) for one weight matrix; 128x128 (two consumers of two 128x64
    accumulators) for the fused gate/up kernel, or for one weight matrix whose N is not a multiple of 256; one
    consumer of 128x64 where N is not a multiple of 128 (e.g. an expert FFN split over 8 TP ranks): 128
    accumulator registers per consumer thread, or fewer. ``block_k`` spans one 128-byte swizzle row (64 16-bit
    values, 128 FP8 ones)."""
    block_k = _SWIZZLE_BYTES // itemsize
    if n is not None and n % 128:
        return MosaicTiling(block_n=64, block_k=block_k, consumers=1)
    block_n = 256 if num_weights == 1 and (n is None or n % 256 == 0) else 128
    return MosaicTiling(block_n=block_n, block_k=block_k)


def smem_bytes(tiling: MosaicTiling, itemsize: int, num_weights: int = 1) -> int:
    """Shared memory of the kernel: pipeline stages of ``itemsize``-byte operands, the two epilogue buffers per
    consumer (16-bit outputs), FP8's scale vectors, barriers (estimate)."""
    stage = (tiling.block_m * tiling.block_k + num_weights * tiling.block_k * tiling.block_n) * itemsize
    epilogue = 2 * tiling.consumers * tiling.block_m * EPILOGUE_N * 2
    scales = 4 * (tiling.consumers * tiling.block_m + num_weights * tiling.block_n) if itemsize == 1 else 0
    return tiling.max_concurrent_steps * stage + epilogue + scales + 64 * tiling.max_concurrent_steps


def fit_stages(tiling: MosaicTiling, itemsize: int, num_weights: int) -> MosaicTiling:
    """``tiling`` with max_concurrent_steps lowered until the kernel fits shared memory."""
    while smem_bytes(tiling, itemsize, num_weights) > MAX_SMEM_BYTES:
        if tiling.max_concurrent_steps == 1:
            raise KernelError(f"MosaicTiling does not fit shared memory even with one stage: {tiling=} "
                              f"needs {smem_bytes(tiling, itemsize, num_weights)} > {MAX_SMEM_BYTES} bytes")
        tiling = dataclasses.replace(tiling, max_concurrent_steps=tiling.max_concurrent_steps - 1)
    return tiling


def _num_sms(tiling: MosaicTiling) -> int:
    if tiling.num_sms is not None:
        return tiling.num_sms
    return targets.current().num_cores or 132


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "out_dtype"))
def _call(lhs, rhs_list, group_sizes, slots, *, tiling: MosaicTiling, interpret: bool, lhs_scale=None,
          rhs_scales=(), out_dtype=None):
    """The kernel on ``lhs [M, K]`` and weights ``rhs_list`` ([S, K, N] each; with ``lhs_scale`` [M], FP8:
    e4m3 K-major [S, N, K] with ``rhs_scales`` [S, N])."""
    fp8 = lhs_scale is not None
    m = lhs.shape[0]
    n = rhs_list[0].shape[1 if fp8 else 2]
    m_pad = -(-m // 8) * 8  # TMA tiles GMEM rows by 8; the pad rows are padding (zeros)
    if m_pad != m:
        lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
        lhs_scale = None if lhs_scale is None else jnp.pad(lhs_scale, (0, m_pad - m))
    tiling = fit_stages(tiling, jnp.dtype(lhs.dtype).itemsize, len(rhs_list))
    items = work_list.build(group_sizes, slots, m_pad, tiling.block_m)
    num_items = items.tile.shape[0]
    fused = len(rhs_list) == 2
    body = functools.partial(_kernel, tiling=tiling, fused=fused, num_items=num_items, fp8=fp8)
    # Mosaic names the kernel (and ptxas reports) by it
    body.__name__ = ("gate_up" if fused else "group_gemm") + ("_fp8" if fp8 else "")
    operands = (lhs, lhs_scale, *rhs_list, *rhs_scales) if fp8 else (lhs, *rhs_list)
    kernel = plgpu.kernel(
        body,
        out_type=semantics.out_struct((m_pad, n), out_dtype or lhs.dtype, *operands, items),
        grid=(_num_sms(tiling),),
        grid_names=("sm",),
        num_threads=tiling.consumers + 1,  # the consumer warpgroups, then the producer
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out = kernel(items.tile, items.lo, items.hi, items.slot, *operands)
    return out[:m] if m_pad != m else out


def _settled(out, interpret: bool):
    """In interpret mode, waits for the kernel before anything else is dispatched. Mosaic GPU's interpreter runs
    eager jax ops inside its host callbacks (jax 0.11.2); XLA:CPU runs a device's programs in order, so a
    computation dispatched after the kernel (even an unrelated one) would queue those ops behind itself while it
    waits for the kernel: a deadlock, seen on this 2-core host. Under an outer jit there is nothing to wait for."""
    if interpret and not isinstance(out, jax.core.Tracer):
        out.block_until_ready()
    return out


def _check_fp8_operands(x_q, x_scale, weights, out_dtype):
    """weights: (w_q [S, N, K] e4m3, w_scale [S, N] float32) pairs."""
    if x_q.dtype != FP8 or x_q.ndim != 2 or x_scale.shape != x_q.shape[:1] or x_scale.dtype != jnp.float32:
        raise KernelError(f"FP8 rows must be e4m3 [M, K] with float32 scales [M]; got {x_q.dtype} {x_q.shape}, "
                          f"{x_scale.dtype} {x_scale.shape}")
    s, n, k = weights[0][0].shape
    for w_q, w_scale in weights:
        if w_q.dtype != FP8 or w_q.shape != (s, n, k) or k != x_q.shape[1] or w_scale.shape != (s, n):
            raise KernelError(f"FP8 weights must be e4m3 K-major [S, N, K] (K = {x_q.shape[1]}) with float32 "
                              f"scales [S, N]; got {w_q.dtype} {w_q.shape}, {w_scale.shape}")
    if jnp.dtype(out_dtype).itemsize != 2:
        raise KernelError(f"FP8 GroupGemm writes float16 or bfloat16; got {out_dtype=}")
    return k, n


def group_gemm_fp8(x_q, x_scale, w_q, w_scale, group_sizes, *, out_dtype=jnp.bfloat16, group_offset=0,
                   slot_of_expert=None, tiling: MosaicTiling | None = None, interpret: bool = False):
    """W8A8 grouped GEMM: ``(x_q * x_scale[:, None]) @ (w_q[s].T * w_scale[s])`` per group, accumulated in
    float32 by 8-bit wgmma, scales applied in the epilogue. ``x_q [M, K]`` e4m3 with per-row scales ``[M]``;
    ``w_q [S, N, K]`` e4m3, K-major (the layout 8-bit wgmma reads), per-(slot, channel) scales ``[S, N]``."""
    k, n = _check_fp8_operands(x_q, x_scale, [(w_q, w_scale)], out_dtype)
    semantics._check_groups(group_sizes, group_offset, slot_of_expert)
    tiling = check_tiling(tiling, FP8, k, n, num_weights=1)
    slots = semantics.slot_of_group(group_sizes, w_q.shape[0], group_offset, slot_of_expert)
    return _settled(_call(x_q, (w_q,), group_sizes, slots, tiling=tiling, interpret=interpret, lhs_scale=x_scale,
                          rhs_scales=(w_scale,), out_dtype=jnp.dtype(out_dtype)), interpret)


def gate_up_fp8(x_q, x_scale, w_gate_q, w_gate_scale, w_up_q, w_up_scale, group_sizes, *, out_dtype=jnp.bfloat16,
                group_offset=0, slot_of_expert=None, tiling: MosaicTiling | None = None, interpret: bool = False):
    """Fused W8A8 ``silu(gate) * up`` (operands as :func:`group_gemm_fp8`): [M, D] x 2 [S, F, D] -> [M, F]."""
    k, n = _check_fp8_operands(x_q, x_scale, [(w_gate_q, w_gate_scale), (w_up_q, w_up_scale)], out_dtype)
    semantics._check_groups(group_sizes, group_offset, slot_of_expert)
    tiling = check_tiling(tiling, FP8, k, n, num_weights=2)
    slots = semantics.slot_of_group(group_sizes, w_gate_q.shape[0], group_offset, slot_of_expert)
    return _settled(_call(x_q, (w_gate_q, w_up_q), group_sizes, slots, tiling=tiling, interpret=interpret,
                          lhs_scale=x_scale, rhs_scales=(w_gate_scale, w_up_scale), out_dtype=jnp.dtype(out_dtype)),
                    interpret)


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               tiling: MosaicTiling | None = None, interpret: bool = False):
    """Grouped GEMM ``[M, K] x [S, K, N] -> [M, N]`` (semantics: :mod:`pallas_kernels.semantics`)."""
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    tiling = check_tiling(tiling, lhs.dtype, rhs.shape[1], rhs.shape[2], num_weights=1)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _settled(_call(lhs, (rhs,), group_sizes, slots, tiling=tiling, interpret=interpret), interpret)


def gate_up(x, w_gate, w_up, group_sizes, *, group_offset=0, slot_of_expert=None,
            tiling: MosaicTiling | None = None, interpret: bool = False):
    """Fused ``silu(x @ w_gate[s]) * (x @ w_up[s])``: [M, D] x 2 [S, D, F] -> [M, F] in x.dtype."""
    semantics.check_group_gemm_args(x, w_gate, group_sizes, group_offset, slot_of_expert)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise KernelError(f"w_up must match w_gate; got {w_gate.shape=} {w_up.shape=} {w_up.dtype=}")
    tiling = check_tiling(tiling, x.dtype, w_gate.shape[1], w_gate.shape[2], num_weights=2)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _settled(_call(x, (w_gate, w_up), group_sizes, slots, tiling=tiling, interpret=interpret), interpret)


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
    within the register budget, two pipeline stages in shared memory). For ``op="expert_ffn"`` (k = D, n = F)
    both of its kernels must."""
    try:
        if op == "expert_ffn":
            check_tiling(tiling, dtype, k, n, num_weights=2)  # gate/up: [M, D] x [D, F]
            check_tiling(tiling, dtype, n, k, num_weights=1)  # down: [M, F] x [F, D]
        else:
            check_tiling(tiling, dtype, k, n, num_weights=1)
    except KernelError:
        return False
    return True


def check_tiling(tiling, dtype, k: int, n: int, num_weights: int = 1) -> MosaicTiling:
    """The tiling to run (the default for ``num_weights`` when None); KernelError, naming the limit, when the
    kernel cannot take it."""
    itemsize = jnp.dtype(dtype).itemsize
    tiling = default_tiling(num_weights, n, itemsize) if tiling is None else tiling
    if not isinstance(tiling, MosaicTiling):
        raise KernelError(f"the mosaic_gpu backend takes a MosaicTiling; got {tiling=}")
    if itemsize != 2 and jnp.dtype(dtype) != FP8:
        raise KernelError(f"the mosaic_gpu backend needs float16, bfloat16 or float8_e4m3fn operands; got {dtype=}")
    if tiling.block_k * itemsize not in (_SWIZZLE_BYTES, 2 * _SWIZZLE_BYTES):
        raise KernelError(f"MosaicTiling.block_k * itemsize must be {_SWIZZLE_BYTES} or {2 * _SWIZZLE_BYTES} bytes "
                          f"(one or two swizzled 128-byte column tiles); got {tiling.block_k=} {dtype=}")
    if k % tiling.block_k or n % tiling.block_n:
        raise KernelError(f"the mosaic_gpu backend needs K % block_k == N % block_n == 0; got {k=} {n=} {tiling=}")
    model = resources(tiling, itemsize, num_weights)
    if model.stages < min(2, tiling.max_concurrent_steps):
        raise KernelError(f"{tiling} fits one pipeline stage in shared memory ({model.smem_bytes} bytes with the "
                          f"epilogue buffers), so TMA loads could not overlap wgmma; use a smaller block or block_k")
    regs = model.accumulator_registers
    budget = accumulator_budget(tiling.consumers)
    if regs > budget:
        kind = "the fused gate/up kernel (two accumulators)" if num_weights == 2 else "the kernel"
        raise KernelError(f"{tiling} needs {regs} float32 accumulator registers per consumer thread in {kind}, over "
                          f"the budget of {budget} (block_m * block_n / consumers * weights / 128; above it "
                          f"ptxas spills and serializes wgmma); e.g. {default_tiling(num_weights)}")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
