"""Grouped GEMM as a hand-written Triton kernel called through jax-triton (GPU only).

Algorithm: the one of :mod:`pallas_kernels.group_gemm_triton`, written in
Triton directly (:mod:`pallas_kernels.triton_kernel`) so that Triton's own
pipeliner and autotuning knobs apply without the (deprecated) Pallas Triton
lowering in between.  The grid is ``(max_items, cdiv(N, BLOCK_N))`` over the
work list of :mod:`pallas_kernels.work_list`.

Tiling: :class:`TritonTiling` of :mod:`pallas_kernels.group_gemm_triton`
(``block_m, block_n, block_k, num_warps, num_stages``).

Importing this module never needs triton or jax_triton: both are imported on
first use, and :func:`importable` says whether that will work.  jax-triton
0.3.1 pairs with triton 3.6 (jax-triton 0.4.x needs triton >= 3.7); the
``gpu`` extra of pyproject.toml pins it.  There is no jax interpret mode; the kernel itself
(:mod:`pallas_kernels.triton_kernel`, which imports no jax) runs in Triton's own interpreter on torch CPU
tensors in ``scripts/check_triton_interpret.py``.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics, targets, work_list
from epsjax.pallas_kernels.errors import KernelError
from epsjax.pallas_kernels.triton_kernel import triton_kernel
from epsjax.pallas_kernels.group_gemm_triton import TritonTiling


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
        out_shape=semantics.out_struct((m, n), lhs.dtype, lhs, rhs, up, items),
        grid=(num_items, -(-n // tiling.block_n)),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        compute_capability=_compute_capability(),
        M=m, K=k, N=n, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        FUSED=fused,
    )


def _compute_capability() -> int | None:
    """The target's compute capability when building for compile-only GPU devices (jax-triton would ask the
    CUDA driver, which is not there); None lets jax-triton ask the GPU it runs on."""
    device = targets.current()
    if not device.compile_only:
        return None
    target = targets.target_for_kind(device.device_kind)
    if target is None:
        raise KernelError(f"jax_triton: no compute capability known for compile-only {device.device_kind!r}; "
                          f"known targets: {sorted(targets.TARGETS)}")
    return target.compute_capability_int


def ptx(m: int, k: int, n: int, dtype, tiling: TritonTiling | None = None, *, fused: bool = False,
        compute_capability: int = 90) -> str:
    """The PTX triton generates for the kernel at these shapes and launch options (what jax-triton compiles
    for ``_call``), for ptxas reports on a machine without the GPU."""
    _, triton = _modules()
    from triton.backends.compiler import GPUTarget

    tiling = TritonTiling() if tiling is None else tiling
    element = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[jnp.dtype(dtype).name]
    signature = {name: "*i32" for name in ("tile_ptr", "lo_ptr", "hi_ptr", "slot_ptr")}
    signature |= {name: f"*{element}" for name in ("lhs_ptr", "rhs_ptr", "up_ptr", "out_ptr")}
    constants = dict(M=m, K=k, N=n, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
                     FUSED=fused)
    signature |= {name: "constexpr" for name in constants}
    source = triton.compiler.ASTSource(fn=triton_kernel(), signature=signature, constexprs=constants)
    # jax_triton empties TRITON_CACHE_DIR at import (it compiles stage by stage); triton.compile needs one.
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", compute_capability, 32),
                                      options={"num_warps": tiling.num_warps, "num_stages": tiling.num_stages})
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    return compiled.asm["ptx"]


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
        raise KernelError(f"w_up must match w_gate; got {w_gate.shape=} {w_up.shape=} {w_up.dtype=}")
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
        raise KernelError("the jax_triton backend has no interpret mode; use pallas_triton with interpret=True")
    if tiling is None:
        tiling = TritonTiling()
    if not isinstance(tiling, TritonTiling):
        raise KernelError(f"the jax_triton backend takes a TritonTiling; got {tiling=}")
    if not importable():
        raise KernelError("the jax_triton backend needs triton and jax_triton with a CUDA jaxlib "
                          "(pip install 'epsjax[gpu]'); they do not import here")
    return tiling


group_gemm_reference = semantics.group_gemm_reference
expert_ffn_reference = semantics.expert_ffn_reference
