"""FP8 W8A8 expert FFN (pallas_kernels.fp8): against its plain-jnp oracle (same quantization), and against the
float FFN within the stated FP8 tolerance, over group sizes, empty groups, one-expert pile-ups, odd M, offsets and
slot tables."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels import fp8

from . import kernel_cases as kc

M, NUM_GROUPS, NUM_SLOTS, D, F = 90, 5, 4, 32, 48


def _quantized(dtype, seed=0, m=M):
    x, w_gate, w_up, w_down = kc.random_ffn_operands(seed, m, D, F, NUM_SLOTS, dtype)
    return x, (w_gate, w_up, w_down), tuple(fp8.quantize_weights(w) for w in (w_gate, w_up, w_down))


def test_weights_are_e4m3_with_a_scale_per_expert_and_output_channel():
    _, (w_gate, _, _), (q_gate, _, _) = _quantized("bfloat16")
    assert q_gate.qvalue.dtype == jnp.float8_e4m3fn and q_gate.qvalue.shape == (NUM_SLOTS, D, F)
    assert q_gate.scale.shape == (NUM_SLOTS, 1, F) and q_gate.scale.dtype == jnp.float32
    err = np.abs(np.asarray(fp8.dequantize(q_gate)) - np.asarray(w_gate, np.float32))
    assert err.max() <= 0.07 * np.abs(np.asarray(w_gate, np.float32)).max()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["auto", "chunked", "dense", "ragged_dot"])
@settings(max_examples=5, deadline=None, derandomize=True)
@given(data=st.data())
def test_fp8_ffn_matches_its_oracle_and_the_float_ffn(dtype, backend, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    x, weights, quantized = _quantized(dtype, int(sizes.sum()))
    out = pk.expert_ffn(x, *quantized, jnp.asarray(sizes), backend=backend, **kw)
    oracle = pk.expert_ffn(x, *quantized, jnp.asarray(sizes), backend="reference", **kw)
    float_out = pk.expert_ffn(x, *weights, jnp.asarray(sizes), backend="reference", **kw)
    assert out.dtype == x.dtype
    out, oracle, float_out = (np.asarray(a, np.float64) for a in (out, oracle, float_out))
    scale = max(np.abs(float_out).max(), 1e-6)
    # The same W8A8 arithmetic up to summation order (and a rare e4m3 rounding flip of the hidden rows).
    assert np.abs(out - oracle).max() <= 2e-2 * scale
    assert np.abs(out - float_out).max() <= fp8.FP8_TOLERANCE * scale
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    start = 0
    for size, slot in zip(sizes, slots):  # slotless and padding rows are exactly zero
        if slot < 0:
            assert np.all(out[start:start + size] == 0)
        start += size
    assert np.all(out[int(sizes.sum()):] == 0)


def test_one_expert_pile_up_and_odd_m():
    x, weights, quantized = _quantized("bfloat16", 3, m=77)
    sizes = jnp.asarray([0, 70, 0, 0, 0], jnp.int32)
    out = np.asarray(pk.expert_ffn(x, *quantized, sizes), np.float64)
    float_out = np.asarray(pk.expert_ffn(x, *weights, sizes, backend="reference"), np.float64)
    assert np.abs(out - float_out).max() <= fp8.FP8_TOLERANCE * np.abs(float_out).max()
    assert np.all(out[70:] == 0)


def test_fp8_needs_all_three_weights_quantized():
    x, weights, quantized = _quantized("bfloat16")
    with pytest.raises(pk.KernelError, match=r"needs all three weights quantized to float8_e4m3fn .*; w_up is bf"):
        pk.expert_ffn(x, quantized[0], weights[1], quantized[2], jnp.asarray([10, 0, 0, 0, 0], jnp.int32))


# ------------------------------------------------- the Mosaic GroupGemm's 8-bit wgmma path, in interpret mode

KERNEL_D, KERNEL_F = 128, 256  # FP8 block_k is 128 (one 128-byte swizzle row)
KERNEL_TILING = pk.MosaicTiling(64, 128, 128, 2, num_sms=2)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(data=st.data())
def test_fp8_group_gemm_kernel_matches_the_dequantized_product(data):
    from epsjax.pallas_kernels import group_gemm_mgpu, semantics

    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    x, w, _, _ = kc.random_ffn_operands(int(sizes.sum()), M, KERNEL_D, KERNEL_F, NUM_SLOTS, "float32")
    x_q, w_q = fp8.quantize_rows(x), fp8.quantize_weights(w)
    out = group_gemm_mgpu.group_gemm_fp8(x_q.qvalue, x_q.scale[:, 0], jnp.swapaxes(w_q.qvalue, 1, 2),
                                         w_q.scale[:, 0, :], jnp.asarray(sizes), tiling=KERNEL_TILING,
                                         interpret=True, **kw)
    expected = semantics.group_gemm_reference(fp8.dequantize(x_q), fp8.dequantize(w_q), jnp.asarray(sizes), **kw)
    assert out.dtype == jnp.bfloat16
    kc.assert_close(out, expected, "bfloat16")  # exact products, float32 sums, one bf16 rounding


@pytest.mark.parametrize("dtype,sizes", [("bfloat16", [20, 0, 41, 9, 15]), ("float32", [0, 0, 80, 0, 0])])
def test_fp8_ffn_on_the_mosaic_kernel_matches_its_oracle_and_the_float_ffn(dtype, sizes):
    x, w_gate, w_up, w_down = kc.random_ffn_operands(1, M, KERNEL_D, KERNEL_F, NUM_SLOTS, dtype)
    quantized = tuple(fp8.quantize_weights(w) for w in (w_gate, w_up, w_down))
    sizes = jnp.asarray(sizes, jnp.int32)
    from epsjax.pallas_kernels import semantics

    out = pk.expert_ffn(x, *quantized, sizes, backend="mosaic_gpu", tiling=KERNEL_TILING, interpret=True)

    def gemm(rows, w):  # the oracle's product on e4m3-rounded rows
        return semantics.group_gemm_reference(fp8.dequantize(fp8.quantize_rows(rows)), fp8.dequantize(w), sizes)

    # The kernel writes the hidden rows in 16 bits (bf16 for float32 inputs) before quantizing them for down.
    hidden = (semantics.silu(gemm(x, quantized[0])) * gemm(x, quantized[1])).astype(jnp.bfloat16)
    oracle = np.asarray(gemm(hidden.astype(jnp.float32), quantized[2]), np.float64)
    float_out = np.asarray(pk.expert_ffn(x, w_gate, w_up, w_down, sizes, backend="reference"), np.float64)
    assert out.dtype == x.dtype
    out = np.asarray(out, np.float64)
    scale = np.abs(float_out).max()
    assert np.abs(out - oracle).max() <= 1e-2 * scale  # summation order and the output's 16-bit rounding
    assert np.abs(out - float_out).max() <= fp8.FP8_TOLERANCE * scale
    assert np.all(out[int(sizes.sum()):] == 0)
