"""DenseGemm: capacity buckets chosen at run time, dropless through the fallback."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels import dense_gemm
from epsjax.pallas_kernels.dense_gemm import DenseTiling

from . import kernel_cases as kc

M, NUM_GROUPS, NUM_SLOTS, K, N = 100, 5, 4, 24, 40
TILINGS = [
    DenseTiling(),  # cdiv(M, S) * (1, 9/8, 5/4, 3/2): 32, 40
    DenseTiling((8, 16), fallback="chunked"),  # most loads overflow: the fallback runs
    DenseTiling((8, 16), fallback="ragged_dot"),
]


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
@pytest.mark.parametrize("dtype", kc.DTYPES)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data())
def test_parity_hypothesis(tiling, dtype, data):
    sizes = data.draw(kc.group_sizes(M, NUM_GROUPS), label="group_sizes")
    kw = data.draw(kc.indirection(NUM_GROUPS, NUM_SLOTS), label="indirection")
    lhs, rhs = kc.random_operands(int(sizes.sum()), M, K, N, NUM_SLOTS, dtype)
    out = pk.group_gemm(lhs, rhs, jnp.asarray(sizes), backend="dense", tiling=tiling, **kw)
    slots = kc.expected_slots(NUM_GROUPS, NUM_SLOTS, kw.get("group_offset", 0), kw.get("slot_of_expert"))
    kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, slots), dtype)


@pytest.mark.parametrize("sizes,expected_branch", [
    ([8, 8, 8, 8, 0], "bucket"),  # fullest slot 8 fits capacity 8
    ([3, 0, 16, 1, 0], "bucket"),  # fullest 16 fits capacity 16
    ([3, 0, 17, 1, 0], "fallback"),  # 17 > 16: no bucket holds it, nothing is dropped
    ([0, 0, 0, 0, 90], "bucket"),  # group 4 has no slot: it does not count
])
def test_bucket_choice_is_made_at_run_time(sizes, expected_branch):
    marker = 7.0

    def fallback(lhs, rhs, group_sizes, **_):
        return jnp.full((lhs.shape[0], rhs.shape[2]), marker, lhs.dtype)

    sizes = np.asarray(sizes, np.int32)
    lhs, rhs = kc.random_operands(1, M, K, N, NUM_SLOTS, "float32")
    out = dense_gemm.group_gemm(lhs, rhs, jnp.asarray(sizes), tiling=DenseTiling((8, 16)), fallback_fn=fallback)
    took_fallback = bool(np.all(np.asarray(out) == marker))
    assert took_fallback == (expected_branch == "fallback")
    if not took_fallback:
        kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs, sizes, kc.expected_slots(5, 4)), "float32")


def test_default_buckets():
    # cdiv(M, S) times 1, 9/8, 5/4, 3/2, rounded up to multiples of 8 and capped at M.
    assert DenseTiling().buckets(100, 4) == (32, 40)
    assert DenseTiling().buckets(4096, 8) == (512, 576, 640, 768)
    assert DenseTiling((8, 16, 1000)).buckets(100, 4) == (8, 16, 100)


@pytest.mark.parametrize("bad", [(), (16, 8), (0, 8), (8, 8), [8, 16]])
def test_tiling_validation(bad):
    with pytest.raises(ValueError, match="capacities"):
        DenseTiling(bad)


def test_fallback_must_be_grouped():
    lhs, rhs = kc.random_operands(1, M, K, N, NUM_SLOTS, "float32")
    with pytest.raises(ValueError, match="fallback"):
        pk.group_gemm(lhs, rhs, jnp.full((4,), 10, jnp.int32), backend="dense",
                      tiling=DenseTiling((8,), fallback="dense"))
