"""Fused expert FFN parity: every backend against the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels.chunked_gemm import ChunkTiling
from epsjax.pallas_kernels.dense_gemm import DenseTiling
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling
from epsjax.pallas_kernels.group_gemm_triton import TritonTiling

from . import kernel_cases as kc

# (backend, tiling, interpret, dtypes, D, F)
CASES = [
    ("reference", None, False, kc.DTYPES, 24, 40),
    ("ragged_dot", None, False, kc.DTYPES, 24, 40),
    ("dense", DenseTiling(), False, kc.DTYPES, 24, 40),
    ("dense", DenseTiling((8,), fallback="chunked"), False, ("bfloat16",), 24, 40),
    ("chunked", ChunkTiling(16), False, kc.DTYPES, 24, 40),
    ("pallas_triton", TritonTiling(16, 16, 16), True, kc.DTYPES, 24, 40),
    ("mosaic_gpu", MosaicTiling(64, 128, 64, 2, num_sms=2), True, ("bfloat16", "float16"), 128, 256),
    ("mosaic_gpu", MosaicTiling(64, 128, 64, 2, num_sms=3, grid_band=2), True, ("bfloat16",), 128, 384),
]
PARAMS = [pytest.param(b, t, i, d, dd, f, id=f"{b}-{t}-{d}") for b, t, i, ds, dd, f in CASES for d in ds]
M, NUM_GROUPS, NUM_SLOTS = 90, 5, 4


@pytest.mark.parametrize("backend,tiling,interpret,dtype,d,f", PARAMS)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(data=st.data())
def test_parity_hypothesis(backend, tiling, interpret, dtype, d, f, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    x, w_gate, w_up, w_down = kc.random_ffn_operands(int(sizes.sum()), M, d, f, NUM_SLOTS, dtype)
    out = pk.expert_ffn(x, w_gate, w_up, w_down, jnp.asarray(sizes), backend=backend, tiling=tiling,
                        interpret=interpret, **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    expected = kc.oracle_expert_ffn(x, w_gate, w_up, w_down, sizes, slots)
    kc.assert_close(out, expected, dtype, kc.FFN_TOLERANCE)


@pytest.mark.parametrize("backend,tiling,interpret,dtype,d,f",
                         [p for p in PARAMS if p.values[3] == "bfloat16"])
def test_all_tokens_to_one_expert_and_padding(backend, tiling, interpret, dtype, d, f):
    sizes = np.array([0, 0, 0, 80, 0], np.int32)  # 10 padding rows
    x, w_gate, w_up, w_down = kc.random_ffn_operands(5, M, d, f, NUM_SLOTS, dtype)
    out = pk.expert_ffn(x, w_gate, w_up, w_down, jnp.asarray(sizes), backend=backend, tiling=tiling,
                        interpret=interpret)
    expected = kc.oracle_expert_ffn(x, w_gate, w_up, w_down, sizes, kc.expected_slots(5, 4))
    kc.assert_close(out, expected, dtype, kc.FFN_TOLERANCE)
    assert np.all(np.asarray(out[80:]) == 0)


def test_gate_up_fusion_matches_unfused():
    # The fused gate/up kernel equals silu(group_gemm(x, Wg)) * group_gemm(x, Wu).
    from epsjax.pallas_kernels import group_gemm_triton

    sizes = jnp.array([30, 0, 40, 20, 0], jnp.int32)
    x, w_gate, w_up, _ = kc.random_ffn_operands(2, M, 24, 40, NUM_SLOTS, "float32")
    tiling = TritonTiling(16, 16, 16)
    fused = group_gemm_triton.gate_up(x, w_gate, w_up, sizes, tiling=tiling, interpret=True)
    gate = pk.group_gemm(x, w_gate, sizes, backend="reference")
    up = pk.group_gemm(x, w_up, sizes, backend="reference")
    np.testing.assert_allclose(fused, gate * (1 / (1 + jnp.exp(-gate))) * up, rtol=1e-5, atol=1e-5)
