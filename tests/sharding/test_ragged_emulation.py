"""The CPU lowering of jax.lax.ragged_all_to_all (sharding.ragged_emulation): the documented example, more slices
than devices, and poisoning on every violated precondition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epsjax import sharding
from epsjax.sharding import ragged_emulation


def _run(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, devices=2):
    """jax.lax.ragged_all_to_all over an `expert` axis of `devices` CPU devices; arguments are per-device rows
    stacked along axis 0."""
    mesh = sharding.make_mesh(expert=devices)
    f = jax.shard_map(functools.partial(jax.lax.ragged_all_to_all, axis_name="expert"), mesh=mesh,
                      in_specs=jax.sharding.PartitionSpec("expert"), out_specs=jax.sharding.PartitionSpec("expert"),
                      check_vma=False)
    with ragged_emulation.emulated_on_cpu():
        args = [jnp.asarray(a) for a in (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)]
        return np.asarray(jax.jit(f)(*args))


# jax.lax.ragged_all_to_all's docstring example: device 0 sends [1] to itself and [2, 2] to device 1; device 1
# sends [3] to device 0 (at offset 1) and [4] to itself (at offset 2).
DOC = dict(operand=[1., 2, 2, 3, 4, 0], output=np.zeros(8), input_offsets=[0, 1, 0, 1], send_sizes=[1, 2, 1, 1],
           output_offsets=[0, 0, 1, 2], recv_sizes=[1, 1, 2, 1])


def test_reproduces_the_documented_example():
    np.testing.assert_array_equal(_run(**DOC), [1, 3, 0, 0, 2, 2, 4, 0])


def test_lowering_is_removed_after_the_block():
    assert not ragged_emulation.installed()
    with ragged_emulation.emulated_on_cpu():
        assert ragged_emulation.installed()
    assert not ragged_emulation.installed()


def test_two_slices_per_device():
    # 2 devices, N = 4 slices each: slices 0, 1 go to device 0, slices 2, 3 to device 1.
    # Device 0 sends operand rows [10] and [11, 12] to device 0 (at 0 and 1), [13] and nothing to device 1 (at 0).
    # Device 1 sends [20] to device 0 (at 3), and [21, 22] to device 1 (at 1).
    got = _run(operand=[10., 11, 12, 13, 20, 21, 22, 0],
               output=np.full(8, -1.),
               input_offsets=[0, 1, 3, 0, 0, 0, 1, 0],
               send_sizes=[1, 2, 1, 0, 1, 0, 2, 0],
               output_offsets=[0, 1, 0, 0, 3, 0, 1, 0],
               recv_sizes=[1, 2, 1, 0, 1, 0, 2, 0])
    np.testing.assert_array_equal(got, [10, 11, 12, 20, 13, 21, 22, -1])


@pytest.mark.parametrize("violation, change", [
    ("recv_sizes differ from the sender's send_sizes", dict(recv_sizes=[1, 1, 1, 1])),
    ("negative size", dict(send_sizes=[1, 2, -1, 1], recv_sizes=[1, -1, 2, 1])),
    ("sent slice past the operand", dict(input_offsets=[0, 5, 0, 1])),
    ("negative input offset", dict(input_offsets=[-1, 1, 0, 1])),
    ("received slice past the output", dict(output_offsets=[0, 3, 1, 2])),
    ("negative output offset", dict(output_offsets=[0, -1, 1, 2])),
    ("overlapping writes", dict(output_offsets=[0, 0, 0, 2])),
])
def test_poisons_every_device_on_a_violated_precondition(violation, change):
    got = _run(**{**DOC, **change})
    assert np.isnan(got).all(), violation


def test_integer_results_are_poisoned_with_the_minimum():
    got = _run(**{**DOC, "operand": np.asarray(DOC["operand"], np.int32), "output": np.zeros(8, np.int32),
                  "recv_sizes": [1, 1, 1, 1]})
    assert (got == np.iinfo(np.int32).min).all()
