"""GroupGemm parity: every grouped backend against the float64 oracle.

Pallas kernels run in interpret mode here (pallas_triton through the Pallas
HLO interpreter, mosaic_gpu through Mosaic GPU interpret mode); their compiled
runs are in test_gpu.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels.chunked_gemm import ChunkTiling
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling
from epsjax.pallas_kernels.group_gemm_triton import TritonTiling

from . import kernel_cases as kc

# (backend, tiling, interpret, dtypes, K, N): K and N fit each kernel's constraints.
CASES = [
    ("ragged_dot", None, False, kc.DTYPES, 24, 40),
    ("chunked", ChunkTiling(8), False, kc.DTYPES, 24, 40),
    ("chunked", ChunkTiling(64), False, ("bfloat16",), 24, 40),
    ("pallas_triton", TritonTiling(16, 16, 16), True, kc.DTYPES, 24, 40),
    ("pallas_triton", TritonTiling(32, 32, 16), True, ("bfloat16",), 48, 40),
    # Two consumer warpgroups of 64 columns each; one consumer; block_k 128 (two swizzled column tiles).
    ("mosaic_gpu", MosaicTiling(64, 128, 64, 2, num_sms=3), True, ("bfloat16", "float16"), 128, 128),
    ("mosaic_gpu", MosaicTiling(64, 64, 64, 1, num_sms=2, consumers=1), True, ("bfloat16",), 64, 128),
    ("mosaic_gpu", MosaicTiling(64, 128, 128, 2, num_sms=2), True, ("bfloat16",), 256, 128),
    # The planar-snake tile order, three N-blocks in bands of two (the last band partial).
    ("mosaic_gpu", MosaicTiling(64, 128, 64, 2, num_sms=3, grid_band=2), True, ("bfloat16",), 128, 384),
]
PARAMS = [pytest.param(b, t, i, d, k, n, id=f"{b}-{t}-{d}") for b, t, i, ds, k, n in CASES for d in ds]
M = 100  # not a multiple of any tile
NUM_GROUPS = 5
NUM_SLOTS = 4


def _run(backend, tiling, interpret, lhs, rhs, sizes, **kw):
    return pk.group_gemm(lhs, rhs, jnp.asarray(sizes), backend=backend, tiling=tiling, interpret=interpret, **kw)


@pytest.mark.parametrize("backend,tiling,interpret,dtype,k,n", PARAMS)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(data=st.data())
def test_parity_hypothesis(backend, tiling, interpret, dtype, k, n, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    lhs, rhs = kc.random_operands(int(sizes.sum()), M, k, n, NUM_SLOTS, dtype)
    out = _run(backend, tiling, interpret, lhs, rhs, sizes, **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, slots), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend,tiling,interpret,dtype,k,n",
                         [p for p in PARAMS if p.values[3] in ("float32", "bfloat16")][:6])
@settings(max_examples=25, deadline=None)
@given(data=st.data(), num_groups=st.integers(1, 9), m=st.integers(1, 200))
def test_parity_wide_grid(backend, tiling, interpret, dtype, k, n, data, num_groups, m):
    """Random M and G too (each example compiles anew): the wide grid."""
    sizes = data.draw(kc.group_sizes(m, num_groups), label="group_sizes")
    kw = data.draw(kc.indirection(num_groups, NUM_SLOTS), label="indirection")
    lhs, rhs = kc.random_operands(int(sizes.sum()), m, k, n, NUM_SLOTS, dtype)
    out = _run(backend, tiling, interpret, lhs, rhs, sizes, **kw)
    slots = kc.expected_slots(num_groups, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, slots), dtype)


# Worked edge cases, each named for what it exercises (M = 100, 5 groups, 4 slots).
EDGE_CASES = {
    "all_to_one_expert": ([0, 0, 100, 0, 0], {}),
    "all_zero_all_padding": ([0, 0, 0, 0, 0], {}),
    "straddle_and_padding": ([1, 63, 2, 0, 30], {}),
    "group_beyond_local_experts": ([10, 20, 30, 20, 20], {}),  # group 4 has no slot
    "expert_parallel_offset": ([10, 20, 30, 20, 20], {"group_offset": 2}),
    "negative_offset": ([10, 20, 30, 20, 20], {"group_offset": -1}),
    "cache_slots": ([10, 20, 30, 20, 19], {"slot_of_expert": np.array([3, -1, 0, -1, 1], np.int32)}),
    "single_row_groups": ([1, 1, 1, 1, 1], {}),
}


@pytest.mark.parametrize("backend,tiling,interpret,dtype,k,n",
                         [p for p in PARAMS if p.values[3] == "bfloat16"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(backend, tiling, interpret, dtype, k, n, case):
    sizes, kw = EDGE_CASES[case]
    sizes = np.asarray(sizes, np.int32)
    kw = {key: jnp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in kw.items()}
    lhs, rhs = kc.random_operands(7, M, k, n, NUM_SLOTS, dtype)
    out = _run(backend, tiling, interpret, lhs, rhs, sizes, **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    expected = kc.oracle_group_gemm(lhs, rhs, sizes, slots)
    kc.assert_close(out, expected, dtype)
    assert np.all(np.asarray(out[int(sizes.sum()):]) == 0), "padding rows must be exactly zero"


@pytest.mark.parametrize("backend,tiling,interpret", [
    ("ragged_dot", None, False), ("chunked", ChunkTiling(16), False),
    ("pallas_triton", TritonTiling(16, 16, 16), True)])
def test_traced_group_offset_under_jit(backend, tiling, interpret):
    # expert parallelism inside shard_map passes axis_index * E_local: a tracer.
    sizes = np.array([10, 20, 30, 20, 20], np.int32)
    lhs, rhs = kc.random_operands(3, M, 24, 40, 2, "float32")
    f = jax.jit(functools.partial(pk.group_gemm, backend=backend, tiling=tiling, interpret=interpret),
                static_argnames=())
    for offset in (0, 2, 4):
        out = f(lhs, rhs, jnp.asarray(sizes), group_offset=jnp.int32(offset))
        expected = kc.oracle_group_gemm(lhs, rhs, sizes, kc.expected_slots(5, 2, offset))
        kc.assert_close(out, expected, "float32")


def test_oracle_catches_a_wrong_slot():
    # The tests can fail: a deliberately wrong slot mapping is far outside tolerance.
    sizes = np.array([50, 50], np.int32)
    lhs, rhs = kc.random_operands(0, 100, 24, 40, 2, "float32")
    out = pk.group_gemm(lhs, rhs, jnp.asarray(sizes), backend="chunked")
    with pytest.raises(AssertionError):
        kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, [1, 0]), "float32")
