"""The public API: signatures, semantics on a worked example, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk


def _worked_example():
    # 4 groups of sizes [2, 0, 3, 1] over M = 8 rows: rows 0-1 group 0, rows 2-4
    # group 2, row 5 group 3, rows 6-7 padding.  K = 1 and rhs[e] = [[10 * e + 1]]
    # so out[r] = lhs[r] * (10 * slot + 1), which keeps the expected array readable.
    lhs = jnp.arange(1, 9, dtype=jnp.float32)[:, None]  # [8, 1]
    rhs = (10 * jnp.arange(4, dtype=jnp.float32) + 1)[:, None, None]  # [4, 1, 1]
    group_sizes = jnp.array([2, 0, 3, 1], jnp.int32)
    return lhs, rhs, group_sizes


@pytest.mark.parametrize("backend", ["reference", "ragged_dot", "auto"])
def test_worked_example(backend):
    lhs, rhs, gs = _worked_example()
    out = pk.group_gemm(lhs, rhs, gs, backend=backend)[:, 0]
    np.testing.assert_allclose(out, [1, 2, 3 * 21, 4 * 21, 5 * 21, 6 * 31, 0, 0])
    # Expert parallelism: rhs holds experts 2 and 3 only (group_offset = 2).
    out = pk.group_gemm(lhs, rhs[:2], gs, group_offset=2, backend=backend)[:, 0]
    np.testing.assert_allclose(out, [0, 0, 3 * 1, 4 * 1, 5 * 1, 6 * 11, 0, 0])
    # Expert cache: expert 0 in slot 3, expert 2 not resident, expert 3 in slot 0.
    slots = jnp.array([3, -1, -1, 0], jnp.int32)
    out = pk.group_gemm(lhs, rhs, gs, slot_of_expert=slots, backend=backend)[:, 0]
    np.testing.assert_allclose(out, [31, 62, 0, 0, 0, 6, 0, 0])


def test_traced_group_offset():
    lhs, rhs, gs = _worked_example()
    f = jax.jit(lambda off: pk.group_gemm(lhs, rhs[:2], gs, group_offset=off))
    np.testing.assert_allclose(f(jnp.int32(2))[:, 0], [0, 0, 3, 4, 5, 66, 0, 0])


def test_errors():
    lhs, rhs, gs = _worked_example()
    with pytest.raises(ValueError, match="lhs"):
        pk.group_gemm(lhs[0], rhs, gs)
    with pytest.raises(ValueError, match="K"):
        pk.group_gemm(jnp.zeros((8, 2)), rhs, gs)
    with pytest.raises(ValueError, match="dtype"):
        pk.group_gemm(lhs.astype(jnp.bfloat16), rhs, gs)
    with pytest.raises(ValueError, match="backend"):
        pk.group_gemm(lhs, rhs, gs, backend="cublas")
    with pytest.raises(ValueError, match="group_offset"):
        pk.group_gemm(lhs, rhs, gs, group_offset=1, slot_of_expert=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="slot_of_expert"):
        pk.group_gemm(lhs, rhs, gs, slot_of_expert=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="w_down"):
        pk.expert_ffn(jnp.zeros((8, 4)), jnp.zeros((2, 4, 6)), jnp.zeros((2, 4, 6)), jnp.zeros((2, 4, 6)),
                      jnp.array([3, 3], jnp.int32))
