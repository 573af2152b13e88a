"""The two calls the models layer makes: ``group_gemm`` and ``expert_ffn``.

Both dispatch on ``backend`` to one implementation module; ``"auto"`` asks
:func:`pallas_kernels.selector.select_backend` (static shape, device kind).
The semantics every backend shares are in :mod:`pallas_kernels.semantics`.

Backends (all take the same arguments):

==============  ===============================================================
reference       plain jnp, E times the work: the test oracle
ragged_dot      jax.lax.ragged_dot (the XLA baseline)
dense           DenseGemm: capacity buckets through XLA's batched matmul
chunked         GroupGemm as an XLA loop over row chunks (the CPU path)
pallas_triton   Pallas kernel through the Triton lowering (GPU; interpret on CPU)
mosaic_gpu      Pallas Mosaic GPU kernel for Hopper (GPU; interpret on CPU)
jax_triton      Triton kernel through jax-triton (GPU only, needs jax_triton)
tokamax         openxla/tokamax's ragged_dot (its Mosaic GPU kernels on Hopper; needs tokamax)
==============  ===============================================================
"""

from __future__ import annotations

import jax.numpy as jnp

from epsjax.pallas_kernels import fp8, selector, semantics, targets
from epsjax.pallas_kernels.errors import KernelError

_INTERPRETABLE = ("pallas_triton", "mosaic_gpu")


def _module(name: str):
    """The implementation module of a backend (imported lazily)."""
    from epsjax.pallas_kernels import (chunked_gemm, dense_gemm, group_gemm_jax_triton, group_gemm_mgpu,
                                group_gemm_triton, ragged_dot, tokamax_gemm)

    return {
        "reference": semantics,
        "ragged_dot": ragged_dot,
        "dense": dense_gemm,
        "chunked": chunked_gemm,
        "pallas_triton": group_gemm_triton,
        "mosaic_gpu": group_gemm_mgpu,
        "jax_triton": group_gemm_jax_triton,
        "tokamax": tokamax_gemm,
    }[name]


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               backend: str = "auto", tiling=None, interpret: bool = False):
    """Grouped GEMM over rows sorted by group.

    Args:
      lhs: [M, K] rows sorted by group; rows at index >= sum(group_sizes) are
        padding and produce zero rows.
      rhs: [E, K, N] weight matrices (E local experts, or S cache slots).
      group_sizes: [G] int32 rows per group (traced).
      group_offset: first local expert (int or traced int32 scalar): group g uses
        rhs[g - group_offset] when group_offset <= g < group_offset + E; rows
        of other groups produce zeros.
      slot_of_expert: optional [G] int32: group g uses rhs[slot_of_expert[g]];
        -1 (not resident) produces zeros; resident experts have distinct slots.
        Requires group_offset == 0 (static), else KernelError.
      backend: "auto" or one of :data:`pallas_kernels.selector.BACKENDS`.
      tiling: the backend's tiling object, or None for its default / the table.
      interpret: run the Pallas backends (pallas_triton, mosaic_gpu) in
        interpret mode, e.g. on CPU.  "auto" never picks an interpreted kernel.

    Returns:
      [M, N] in lhs.dtype, accumulated in float32.
    """
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    name, tiling = _resolve(backend, tiling, interpret, lhs.shape[0], rhs.shape[0],
                            group_sizes.shape[0], rhs.shape[1], rhs.shape[2], lhs.dtype, "group_gemm")
    kwargs = dict(group_offset=group_offset, slot_of_expert=slot_of_expert)
    if name == "reference":
        return semantics.group_gemm_reference(lhs, rhs, group_sizes, **kwargs)
    if name in ("ragged_dot", "tokamax"):
        return _module(name).group_gemm(lhs, rhs, group_sizes, **kwargs)
    if name == "dense":
        kwargs["fallback_fn"] = _dense_fallback(tiling, lhs.shape[0], rhs.shape[0], group_sizes.shape[0],
                                                rhs.shape[1], rhs.shape[2], lhs.dtype, "group_gemm")
    return _module(name).group_gemm(lhs, rhs, group_sizes, tiling=tiling, interpret=interpret, **kwargs)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               backend: str = "auto", tiling=None, interpret: bool = False):
    """Per-row expert FFN: y = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e].

    Args:
      x: [M, D] rows sorted by group (padding rows past sum(group_sizes) -> 0).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
      group_sizes, group_offset, slot_of_expert, backend, tiling, interpret: as
        in :func:`group_gemm` (e = the group's slot; slotless rows -> 0).

    FP8 W8A8: with weights quantized by :func:`pallas_kernels.fp8.quantize_weights` (qwix.QArray), the rows are
    quantized per token before each GEMM (:mod:`pallas_kernels.fp8`); ``backend`` then names the float backend
    that runs the dequantized products off GPU ("reference": the FP8 oracle).

    Returns:
      [M, D] in x.dtype.  Accumulation is float32; the hidden [M, F] is
      rounded to x.dtype between the fused gate/up GEMM and the down GEMM.
      The gate and up products share one kernel (pallas_triton, mosaic_gpu,
      jax_triton: their [M, 2F] never reaches memory; chunked: one row chunk
      at a time).
    """
    if fp8.is_quantized(w_gate):  # FP8 W8A8 experts: quantized rows, e4m3 products, float32 accumulation
        return _expert_ffn_fp8(x, w_gate, w_up, w_down, group_sizes, group_offset=group_offset,
                               slot_of_expert=slot_of_expert, backend=backend, tiling=tiling, interpret=interpret)
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    name, tiling = _resolve(backend, tiling, interpret, x.shape[0], w_gate.shape[0],
                            group_sizes.shape[0], w_gate.shape[1], w_gate.shape[2], x.dtype, "expert_ffn")
    kwargs = dict(group_offset=group_offset, slot_of_expert=slot_of_expert)
    args = (x, w_gate, w_up, w_down, group_sizes)
    if name == "reference":
        return semantics.expert_ffn_reference(*args, **kwargs)
    if name in ("ragged_dot", "tokamax"):
        return _module(name).expert_ffn(*args, **kwargs)
    if name == "dense":
        kwargs["fallback_fn"] = _dense_fallback(tiling, x.shape[0], w_gate.shape[0], group_sizes.shape[0],
                                                w_gate.shape[1], w_gate.shape[2], x.dtype, "expert_ffn")
    return _module(name).expert_ffn(*args, tiling=tiling, interpret=interpret, **kwargs)


def _expert_ffn_fp8(x, w_gate, w_up, w_down, group_sizes, *, group_offset, slot_of_expert, backend, tiling,
                    interpret):
    """The W8A8 expert FFN (:mod:`pallas_kernels.fp8`). ``backend="mosaic_gpu"`` (or ``"auto"`` on Hopper) runs the
    FP8 GroupGemm (``interpret=True`` off GPU); ``"reference"`` the FP8 oracle; any other backend (and ``tiling``,
    ``interpret``) names the float backend for the dequantized products."""
    groups = dict(group_offset=group_offset, slot_of_expert=slot_of_expert)
    if backend == "reference":
        return fp8.expert_ffn_reference(x, w_gate, w_up, w_down, group_sizes, **groups)
    if fp8.uses_fp8_kernel(backend, *w_gate.qvalue.shape[1:]):  # it checks the operands
        return fp8.expert_ffn_kernel(x, w_gate, w_up, w_down, group_sizes, tiling=tiling, interpret=interpret,
                                     **groups)
    fp8.check_fp8_args(x, w_gate, w_up, w_down)

    on_gpu = targets.current().is_gpu and jnp.dtype(x.dtype).itemsize == 2
    compute_dtype = x.dtype if on_gpu else jnp.float32

    def gemm(rows_MK, w):  # rows already through e4m3 x e4m3 weights
        return group_gemm(rows_MK.astype(compute_dtype), fp8.dequantize(w).astype(compute_dtype), group_sizes,
                          backend=backend, tiling=tiling, interpret=interpret, **groups).astype(jnp.float32)

    x_q = fp8.dequantize(fp8.quantize_rows(x))  # once for the gate and the up GEMM
    hidden = semantics.silu(gemm(x_q, w_gate)) * gemm(x_q, w_up)  # [M, F]
    return gemm(fp8.dequantize(fp8.quantize_rows(hidden)), w_down).astype(x.dtype)


def _resolve(backend, tiling, interpret, m, num_slots, num_groups, k, n, dtype, op):
    """(backend name, tiling) after "auto" and the platform checks."""
    if backend == "auto":
        choice = selector.select_backend(tokens_per_expert=m / max(num_groups, 1), num_experts=num_slots,
                                         k=k, n=n, dtype=dtype, op=op)
        return choice.backend, tiling if tiling is not None else choice.tiling
    if backend not in selector.BACKENDS:
        raise KernelError(f"unknown backend {backend=}; expected 'auto' or one of {selector.BACKENDS}")
    if tiling is not None and backend in ("reference", "ragged_dot", "tokamax"):
        raise KernelError(f"backend {backend!r} takes no tiling; got {tiling=}")
    if tiling is not None and not isinstance(tiling, selector.tiling_class(backend)):
        raise KernelError(f"backend {backend!r} takes a {selector.tiling_class(backend).__name__}; got {tiling=}")
    if interpret and backend == "jax_triton":
        raise KernelError("backend 'jax_triton' has no interpret mode; use 'pallas_triton' with interpret=True")
    if backend in selector.GPU_ONLY and selector.platform() not in ("gpu", "cuda"):
        if backend == "jax_triton" or not interpret:
            hint = "" if backend == "jax_triton" else "; pass interpret=True to run it in interpret mode"
            raise KernelError(f"backend {backend!r} needs a CUDA GPU, and the program is built for "
                             f"{selector.platform()!r} (no GPU device, and no GPU mesh in context){hint}")
    return backend, tiling


def _dense_fallback(tiling, m, num_slots, num_groups, k, n, dtype, op):
    """The grouped implementation the dense path runs when no capacity bucket fits."""
    name = getattr(tiling, "fallback", "auto")
    if name == "auto":
        name = selector.select_backend(tokens_per_expert=m / max(num_groups, 1), num_experts=num_slots, k=k, n=n,
                                       dtype=dtype, op=op, max_tokens_per_expert=float(m),
                                       exclude=("dense",)).backend
    if name == "dense" or name not in selector.BACKENDS:
        raise KernelError(f"DenseTiling.fallback must name a grouped backend; got {name!r}")
    if name == "reference":
        return getattr(semantics, f"{op}_reference")
    return getattr(_module(name), op)  # a module-level function: a stable static argument
