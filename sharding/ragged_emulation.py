"""`jax.lax.ragged_all_to_all` on CPU, for tests: a lowering of the real primitive that emulates its documented
semantics with all_gathers, and poisons its result when a precondition is violated.

XLA:CPU has no ragged all-to-all, so without this the GPU transport of sharding/ep_moe.py could not run in the
CPU test grid. Inside `with emulated_on_cpu():`, programs that use `jax.lax.ragged_all_to_all` inside shard_map lower on
CPU to the emulation (P times the memory of the real collective: every device gathers every operand), so the
transport's offset arithmetic runs through the real primitive and its jaxpr, not a stand-in.

The documented contract (jax.lax.ragged_all_to_all's docstring), for N = len(input_offsets) slices, of which
N / P go to each of the P devices of the axis (slice i to device i // (N / P)):

- the receiver's recv_sizes[i] equals the send_sizes of the slice that arrives there (undefined behaviour on a GPU
  otherwise);
- sizes are >= 0; a sent slice lies inside the operand; a received slice lies inside the output;
- received slices do not overlap.

Any violation anywhere in the axis turns every device's result into NaN (or the integer minimum), so a test
cannot pass over a route that would be undefined behaviour on a GPU. `check_preconditions` returns the same
verdict for tests that want to see it directly.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lax import parallel as lax_parallel

from epsjax.sharding.errors import PlanError


def installed() -> bool:
    return lax_parallel.ragged_all_to_all_p in mlir._platform_specific_lowerings["cpu"]


_recorders: list[list] = []  # the innermost emulated_on_cpu(record=...) list, at lowering time


@contextlib.contextmanager
def emulated_on_cpu(record: list | None = None):
    """Within the block, ragged_all_to_all lowers on CPU to the emulation (programs compiled inside keep it).

    record: a list to which every run of a collective lowered inside appends, per receiving device,
        (operand dtype name, operand row shape, received rows): what each receiver got, as the real collective
        would deliver it (call jax.effects_barrier() before reading it)."""
    was_installed = installed()
    if not was_installed:
        mlir.register_lowering(lax_parallel.ragged_all_to_all_p, _rule, platform="cpu")
    _recorders.append(record)
    try:
        yield
    finally:
        _recorders.pop()
        if not was_installed:
            del mlir._platform_specific_lowerings["cpu"][lax_parallel.ragged_all_to_all_p]


def _rule(ctx, *args, axis_name, axis_index_groups):
    record = _recorders[-1] if _recorders else None
    return mlir.lower_fun(functools.partial(_lowering, record=record), multiple_results=False)(
        ctx, *args, axis_name=axis_name, axis_index_groups=axis_index_groups)


def _lowering(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
              axis_index_groups, record):
    if axis_index_groups is not None:
        raise NotImplementedError("the ragged_all_to_all emulation does not support axis_index_groups")
    if record is not None:
        row = (jnp.dtype(operand.dtype).name, tuple(operand.shape[1:]))
        jax.debug.callback(lambda rows: record.append((*row, int(rows))), jnp.sum(recv_sizes))
    return ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                             axis_name=axis_name)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all's documented result from the emulation, poisoned where a precondition is violated:
    a drop-in for the collective inside shard_map on any platform (the lowering above uses it; so can a test, through
    the transports' `collective=` argument)."""
    result, ok = emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                            axis_name=axis_name)
    return poison_unless(ok, result)


def poison_unless(ok, result):
    if jnp.issubdtype(result.dtype, jnp.floating):
        bad = jnp.full_like(result, jnp.nan)
    elif jnp.issubdtype(result.dtype, jnp.integer):
        bad = jnp.full_like(result, jnp.iinfo(result.dtype).min)
    else:
        bad = jnp.logical_not(result)
    return jnp.where(ok, result, bad)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """(result, ok): the result the collective documents, and whether every device's arguments met its
    preconditions (the same verdict on every device). Call inside shard_map over `axis_name`."""
    N = input_offsets.shape[0]
    P = jax.lax.axis_size(axis_name)
    if N % P:
        raise PlanError(f"ragged_all_to_all: {N} slices do not divide over the axis size {P}")
    per_device = N // P
    me = jax.lax.axis_index(axis_name)
    rows_in, rows_out = operand.shape[0], output.shape[0]
    input_offsets, send_sizes, output_offsets, recv_sizes = (
        a.astype(jnp.int32) for a in (input_offsets, send_sizes, output_offsets, recv_sizes))

    # What each sender said it sends, gathered: [source, slice].
    operand_all = jax.lax.all_gather(operand, axis_name)
    input_offsets_all = jax.lax.all_gather(input_offsets, axis_name)
    send_sizes_all = jax.lax.all_gather(send_sizes, axis_name)
    output_offsets_all = jax.lax.all_gather(output_offsets, axis_name)

    # Sender side: my slices lie inside my operand.
    ok = jnp.all((send_sizes >= 0) & (input_offsets >= 0) & (input_offsets + send_sizes <= rows_in))

    # Receiver side: slot i comes from source i // per_device, which sent it as its slice me * per_device + j.
    slot = jnp.arange(N)
    source = slot // per_device
    sent_as = me * per_device + slot % per_device
    size = send_sizes_all[source, sent_as]
    start = output_offsets_all[source, sent_as]
    from_row = input_offsets_all[source, sent_as]
    ok &= jnp.all(recv_sizes == size)
    ok &= jnp.all((start >= 0) & (start + size <= rows_out))
    nonempty = size > 0
    end = start + size
    overlap_NN = (nonempty[:, None] & nonempty[None, :] & (slot[:, None] < slot[None, :])
                  & (start[:, None] < end[None, :]) & (start[None, :] < end[:, None]))
    ok &= ~jnp.any(overlap_NN)
    ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0

    row = jnp.arange(rows_out, dtype=jnp.int32)
    result = output
    for i in range(N):
        mine = (row >= start[i]) & (row < start[i] + size[i])
        source_rows = jnp.clip(from_row[i] + row - start[i], 0, rows_in - 1)
        received = operand_all[i // per_device][source_rows]
        result = jnp.where(mine.reshape((-1,) + (1,) * (output.ndim - 1)), received, result)
    return result, ok
