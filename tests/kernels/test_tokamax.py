"""openxla/tokamax's ragged_dot as a backend (pallas_kernels.tokamax_gemm): parity of the package's wrapping (slot
permutation, group offsets, slot tables, padding rows) around tokamax's own call, which runs its XLA implementation
on CPU; off GPU the backend itself computes the reference's where-masked expansion. The compiled Hopper build is in
tests/aot."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels import selector, tokamax_gemm

from . import kernel_cases as kc

M, NUM_GROUPS, NUM_SLOTS, K, N = 90, 5, 4, 24, 40


# Skipped without the aot (or gpu) extra, except in CI, where that is a failure (as tests/aot).
if not tokamax_gemm.importable() and os.environ.get("CI"):
    raise RuntimeError("CI must test the tokamax backend, but tokamax does not import (the aot extra)")
pytestmark = pytest.mark.skipif(not tokamax_gemm.importable(), reason="tokamax is not installed (the aot extra)")


@pytest.mark.parametrize("dtype", kc.DTYPES)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(data=st.data())
def test_group_gemm_through_tokamax_matches_the_oracle(dtype, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    lhs, rhs = kc.random_operands(int(sizes.sum()), M, K, N, NUM_SLOTS, dtype)
    out = tokamax_gemm.group_gemm_tokamax(lhs, rhs, jnp.asarray(sizes), implementation="xla", **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, slots), dtype)


@pytest.mark.parametrize("dtype", kc.DTYPES)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(data=st.data())
def test_expert_ffn_through_tokamax_matches_the_oracle(dtype, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    x, w_gate, w_up, w_down = kc.random_ffn_operands(int(sizes.sum()), M, K, N, NUM_SLOTS, dtype)
    out = tokamax_gemm.expert_ffn_tokamax(x, w_gate, w_up, w_down, jnp.asarray(sizes), implementation="xla", **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    kc.assert_close(out, kc.oracle_expert_ffn(x, w_gate, w_up, w_down, sizes, slots), dtype, kc.FFN_TOLERANCE)


def test_traced_group_offset_and_one_expert_pile_up():
    sizes = np.array([0, 0, 80, 0, 0], np.int32)  # every row on one expert, 10 padding rows
    x, w_gate, w_up, w_down = kc.random_ffn_operands(3, M, K, N, NUM_SLOTS, "bfloat16")
    fn = jax.jit(lambda offset: tokamax_gemm.expert_ffn_tokamax(x, w_gate, w_up, w_down, jnp.asarray(sizes),
                                                                group_offset=offset, implementation="xla"))
    for offset in (0, 1, 3):
        expected = kc.oracle_expert_ffn(x, w_gate, w_up, w_down, sizes, kc.expected_slots(5, 4, offset))
        out = fn(jnp.int32(offset))
        kc.assert_close(out, expected, "bfloat16", kc.FFN_TOLERANCE)
        assert np.all(np.asarray(out[80:]) == 0)


def test_the_backend_off_gpu_is_the_reference_and_never_auto_selected():
    x, w_gate, w_up, w_down = kc.random_ffn_operands(4, M, K, N, NUM_SLOTS, "float32")
    sizes = jnp.asarray([20, 10, 0, 40, 5], jnp.int32)
    out = pk.expert_ffn(x, w_gate, w_up, w_down, sizes, backend="tokamax")
    ref = pk.expert_ffn(x, w_gate, w_up, w_down, sizes, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert not selector.available("tokamax", "cpu") and selector.available("tokamax", "gpu")
    with pytest.raises(pk.KernelError, match=r"backend 'tokamax' takes no tiling"):
        pk.expert_ffn(x, w_gate, w_up, w_down, sizes, backend="tokamax", tiling=pk.ChunkTiling(8))
