"""The public API: signatures, semantics on a worked example, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from epsjax import pallas_kernels as pk

from . import kernel_cases as kc


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


@pytest.mark.parametrize("backend", ["mosaic_gpu", "chunked"])
def test_kernels_run_inside_shard_map(backend):
    # Under shard_map (check_vma on), a Pallas kernel's output type must say which mesh axes it varies over; the
    # expert-parallel MoE calls the kernels this way. (pallas_triton's interpret mode trips over jax's own
    # varying-axes check inside shard_map; tests/aot builds it there for a GPU instead.)
    mesh = jax.make_mesh((2,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    lhs, rhs = kc.random_operands(3, 64, 64, 128, 4, "bfloat16")
    sizes = jnp.array([20, 0, 30, 14], jnp.int32)
    tiling = pk.MosaicTiling(64, 128, 64, 2, num_sms=2) if backend == "mosaic_gpu" else None

    def local(lhs_MK, rhs_EKN, sizes_G, offset=None):  # each device: its 2 experts (group_offset = 2 * index)
        offset = jax.lax.axis_index("expert") * 2 if offset is None else offset
        return pk.group_gemm(lhs_MK, rhs_EKN, sizes_G, group_offset=offset, backend=backend, tiling=tiling,
                             interpret=backend != "chunked")[None]

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert"), P()), out_specs=P("expert"))
    if backend == "mosaic_gpu":
        # The typing is what shard_map checks, at trace time. Mosaic GPU's interpreter cannot run two devices'
        # kernels at once: its end-of-kernel check that no barrier is left allocated reads every device's shared
        # memory, so it fails while the other device's kernel still runs (jax 0.11.2). Each device's part runs
        # on its own below.
        jax.jit(sharded).lower(lhs, rhs, sizes)
        out = jnp.concatenate([local(lhs, rhs[2 * d:2 * d + 2], sizes, offset=2 * d) for d in range(2)])
    else:
        out = sharded(lhs, rhs, sizes)
    expected = kc.oracle_group_gemm(lhs, rhs, np.asarray(sizes), kc.expected_slots(4, 4))
    kc.assert_close(out.sum(0), expected, "bfloat16")
