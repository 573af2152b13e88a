"""FP8 W8A8 expert FFN: e4m3 weights with per-(expert, output channel) scales, activations quantized per token at
run time (dynamic absmax), float32 accumulation, scales applied after the product.

Quantization is qwix's (``qwix.quantize``; a weight is a ``qwix.QArray``: an e4m3 ``qvalue [E, K, N]`` and a
float32 ``scale [E, 1, N]``). The expert FFN quantizes its input rows, runs gate and up, quantizes the hidden
``silu(gate) * up`` rows again, and runs down: every GEMM is e4m3 x e4m3.

Where it runs (:func:`pallas_kernels.expert_ffn` picks): on Hopper (``backend="auto"`` where the kernel takes the
shapes, or ``"mosaic_gpu"``), :func:`expert_ffn_kernel` on the Mosaic GroupGemm's FP8 path
(:func:`pallas_kernels.group_gemm_mgpu.gate_up_fp8` / ``group_gemm_fp8``): e4m3 x e4m3
8-bit wgmma into float32, per-row and per-channel scales applied in the epilogue, the hidden rows written in
16 bits and quantized again for down; ``interpret=True`` runs it in Mosaic GPU interpret mode on CPU. The
weights are handed to it K-major ([E, N, K], the layout 8-bit wgmma reads), transposed inside the program
from qwix's [E, K, N] on every call: a copy of the expert weights per call, to be removed by storing them
K-major at load. Elsewhere (in pallas_kernels.api, which builds on this module) the e4m3 operands are
dequantized and the products run through a float backend (``backend``, default the selector's): in float32 off
GPU (no FP8 arithmetic on CPU; a product of two e4m3 values is exact in float32, so this computes what an FP8 GEMM
computes up to summation order), in the activations' 16-bit dtype on other GPUs. Two candidates were compiled for H100
(compile-only, jax 0.11.2) and rejected: ``qwix.ragged_dot`` on e4m3 operands lowers in XLA:GPU to one dense dot
over E * K (every expert's weights for every row: E times the work), and tokamax 0.0.17's sm90 quantized
ragged_dot refuses the e4m3 -> bf16 conversion with this ptxas.

FP8 error against the float model (tests/kernels/test_fp8.py): relative to the largest output of the layer,
about 3-6% per GEMM at O(1) activations; see :data:`FP8_TOLERANCE`.
"""

from __future__ import annotations

import jax.numpy as jnp

from epsjax.pallas_kernels import semantics, targets
from epsjax.pallas_kernels.errors import KernelError

FP8 = jnp.float8_e4m3fn
# |fp8 layer output - float output| <= FP8_TOLERANCE * max |float output|, for the expert FFN (three GEMMs).
FP8_TOLERANCE = 0.12


def _qwix():
    try:
        import qwix
    except ImportError as e:
        raise KernelError("FP8 needs the qwix package, an epsjax dependency: pip install -e .") from e
    return qwix


def is_quantized(w) -> bool:
    """Whether ``w`` is a quantized (qwix.QArray) weight."""
    try:
        import qwix
    except ImportError:
        return False
    return isinstance(w, qwix.QArray)


def quantize_weights(w_EKN):
    """Stacked expert weights [E, K, N] -> e4m3 with one float32 scale per (expert, output channel)."""
    if w_EKN.ndim != 3:
        raise KernelError(f"FP8 weights are stacked experts [E, K, N]; got shape {w_EKN.shape}")
    return _qwix().quantize(jnp.asarray(w_EKN, jnp.float32), FP8, channelwise_axes=(0, 2), scale_dtype=jnp.float32)


def quantize_rows(x_MK):
    """Activations [M, K] -> e4m3 with one float32 scale per row (dynamic absmax)."""
    return _qwix().quantize(x_MK.astype(jnp.float32), FP8, channelwise_axes=(0,), scale_dtype=jnp.float32)


def dequantize(q):
    return _qwix().dequantize(q)


def check_fp8_args(x, w_gate, w_up, w_down) -> None:
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not is_quantized(w) or w.qvalue.dtype != FP8:
            raise KernelError(f"the FP8 expert FFN needs all three weights quantized to {jnp.dtype(FP8).name} "
                              f"(pallas_kernels.fp8.quantize_weights); {name} is {getattr(w, 'dtype', type(w))}")
    e, d, f = w_gate.qvalue.shape
    if x.ndim != 2 or x.shape[1] != d or w_up.qvalue.shape != (e, d, f) or w_down.qvalue.shape != (e, f, d):
        raise KernelError(f"FP8 expert FFN shapes: x [M, D], gate/up [E, D, F], down [E, F, D]; got {x.shape=} "
                          f"{w_gate.qvalue.shape=} {w_up.qvalue.shape=} {w_down.qvalue.shape=}")


def _k_major(w):
    """A qwix weight [E, K, N] as the FP8 GroupGemm takes it: e4m3 [E, N, K] and float32 scales [E, N]."""
    return jnp.swapaxes(w.qvalue, 1, 2), w.scale[:, 0, :]


def uses_fp8_kernel(backend: str, d: int, f: int) -> bool:
    """Whether the expert FFN runs on the FP8 Mosaic GroupGemm: ``backend="mosaic_gpu"``, or ``"auto"`` on a
    Hopper GPU where the kernel takes the shapes."""
    from epsjax.pallas_kernels import group_gemm_mgpu

    if backend == "mosaic_gpu":
        return True
    return backend == "auto" and targets.current().is_hopper and group_gemm_mgpu.supports(FP8, d, f, op="expert_ffn")


def expert_ffn_kernel(x, w_gate, w_up, w_down, group_sizes, *, tiling=None, interpret=False, group_offset=0,
                      slot_of_expert=None):
    """The W8A8 FFN on the Mosaic GroupGemm's 8-bit wgmma: the fused gate/up kernel, then down. Arguments as
    :func:`pallas_kernels.expert_ffn` with quantized weights (``interpret=True`` off GPU)."""
    from epsjax.pallas_kernels import group_gemm_mgpu

    check_fp8_args(x, w_gate, w_up, w_down)
    groups = dict(group_offset=group_offset, slot_of_expert=slot_of_expert)
    out_dtype = x.dtype if jnp.dtype(x.dtype).itemsize == 2 else jnp.bfloat16
    x_q = quantize_rows(x)
    hidden = group_gemm_mgpu.gate_up_fp8(x_q.qvalue, x_q.scale[:, 0], *_k_major(w_gate), *_k_major(w_up),
                                         group_sizes, out_dtype=out_dtype, tiling=tiling, interpret=interpret,
                                         **groups)
    h_q = quantize_rows(hidden)
    return group_gemm_mgpu.group_gemm_fp8(h_q.qvalue, h_q.scale[:, 0], *_k_major(w_down), group_sizes,
                                          out_dtype=out_dtype, tiling=tiling, interpret=interpret,
                                          **groups).astype(x.dtype)


def expert_ffn_reference(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None):
    """The plain-jnp oracle of :func:`pallas_kernels.expert_ffn` on FP8 weights: the reference FFN loop on
    dequantized operands, the rows quantized before each GEMM as the FP8 path does."""
    check_fp8_args(x, w_gate, w_up, w_down)

    def gemm(rows, w):  # rows already through e4m3
        return semantics.group_gemm_reference(rows, dequantize(w), group_sizes, group_offset=group_offset,
                                              slot_of_expert=slot_of_expert)

    x_q = dequantize(quantize_rows(x))
    hidden = semantics.silu(gemm(x_q, w_gate)) * gemm(x_q, w_up)
    return gemm(dequantize(quantize_rows(hidden)), w_down).astype(x.dtype)
