"""The two transports that move routed rows to the devices owning their experts and back, inside shard_map.

Both see the same thing on every device of the expert-parallel group (size P), for one pipeline stage: a
buffer of rows sorted by destination (`x_sorted [M, D]`) and a `Route` of [P] int32 vectors derived from the
all-gathered per-destination counts. A row is one (token, destination device) pair: a token goes once to each
device holding at least one of its experts in the stage, whatever number of them it holds (sharding/ep_moe.py).
Neither transport drops a row.

ragged (GPU): `jax.lax.ragged_all_to_all` sends exactly the routed rows. The receive buffer holds the rows of
    source 0, then source 1, ... packed; its static size is P * rows_per_peer, where rows_per_peer (a static
    bound, see `rows_per_peer`) is the most rows one source can send one receiver in one stage: one per token,
    so it can never overflow. The return trip writes the rows straight back to their sorted positions at the
    source.
padded (CPU, any platform): `jax.lax.all_to_all` of a [P * rows_per_peer, D] buffer: peer p's slot holds the
    rows for p, then `fill`. Dropless by the same bound. It moves P * rows_per_peer rows per device however few
    are routed, and holds a send and a receive buffer of P * rows_per_peer * D elements each (ragged: M * D and
    P * rows_per_peer * D).

Worst case (every token of a chunk routed to every device in a stage): both move T_u * P rows per device and
stage, where the per-(token, k) dispatch this replaced moved T_u * K.

On CPU, where XLA has no ragged_all_to_all, tests run the ragged transport inside
`sharding.ragged_emulation.emulated_on_cpu()`, which lowers the real primitive to its documented semantics from an
all_gather (P times the memory), poisoned (NaN) on any violated precondition.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Route(NamedTuple):
    """One stage's traffic as seen by one device: all [P] int32, indexed by peer."""

    send_offsets: jax.Array       # where my rows for peer p start in my sorted buffer
    send_sizes: jax.Array         # rows I send to p
    recv_sizes: jax.Array         # rows p sends me
    offsets_at_peer: jax.Array    # where my rows land in p's packed receive buffer (after lower-ranked sources')
    recv_offsets: jax.Array       # where p's rows start in my packed receive buffer
    peer_send_offsets: jax.Array  # where p's rows for me start in p's sorted buffer (the return destination)


def rows_per_peer(tokens: int) -> int:
    """The most rows one device can send one peer in one stage: one per token of the chunk (a token's experts on
    that peer travel as one row)."""
    return tokens


def varying(x, axis_name):
    """x typed as varying over the axes of `axis_name` (a shard_map type: constants start invariant)."""
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,) if axis_name else ()
    missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def exclusive_cumsum(x, axis: int = 0):
    return jnp.cumsum(x, axis=axis) - x


# ragged: exactly the routed rows --------------------------------------------------------------------------------


def ragged_dispatch(x_sorted_MC, route: Route, recv_rows: int, axis_name, *, collective=None, fill=0):
    """Sends my rows for each peer; returns the packed receive buffer [recv_rows, C] (rows not received hold
    `fill`) and where each source's rows start in it [P]."""
    collective = collective or jax.lax.ragged_all_to_all
    recv_RC = jnp.full((recv_rows,) + x_sorted_MC.shape[1:], fill, x_sorted_MC.dtype)
    # The output buffer is per-device data: typed varying over the axis (a constant is typed invariant, which is
    # harmless for inference but gives gradients the wrong type).
    recv_RC = varying(recv_RC, axis_name)
    recv_RC = collective(x_sorted_MC, recv_RC, route.send_offsets, route.send_sizes, route.offsets_at_peer,
                         route.recv_sizes, axis_name=axis_name)
    return recv_RC, route.recv_offsets


def ragged_return(y_recv_RD, y_sorted_MD, route: Route, axis_name, *, collective=None):
    """Sends each source's computed rows back into its sorted buffer `y_sorted_MD` (rows of other stages kept)."""
    collective = collective or jax.lax.ragged_all_to_all
    return collective(y_recv_RD, y_sorted_MD, route.recv_offsets, route.recv_sizes, route.peer_send_offsets,
                      route.send_sizes, axis_name=axis_name)


# padded: fixed-size slots, one per peer ---------------------------------------------------------------------------


def padded_dispatch(x_sorted_MC, route: Route, rows: int, axis_name, *, fill=0):
    """Slot p of the send buffer holds my rows for peer p, then `fill`; all_to_all swaps slots. Returns the
    receive buffer [P * rows, C] (slot q from source q) and where each source's rows start in it [P]."""
    P = route.send_sizes.shape[0]
    M = x_sorted_MC.shape[0]
    row_R = jnp.arange(rows, dtype=jnp.int32)
    index_PR = route.send_offsets[:, None] + row_R[None, :]
    valid_PR = row_R[None, :] < route.send_sizes[:, None]
    valid_PR = valid_PR.reshape(valid_PR.shape + (1,) * (x_sorted_MC.ndim - 1))
    send_PRC = jnp.where(valid_PR, x_sorted_MC[jnp.clip(index_PR, 0, M - 1)], jnp.asarray(fill, x_sorted_MC.dtype))
    send_XC = send_PRC.reshape((P * rows,) + x_sorted_MC.shape[1:])
    recv_XC = jax.lax.all_to_all(send_XC, axis_name, 0, 0, tiled=True) if axis_name else send_XC
    return recv_XC, jnp.arange(P, dtype=jnp.int32) * rows


def padded_return(y_recv_XD, y_sorted_MD, route: Route, rows: int, axis_name):
    """The reverse all_to_all: slot p comes back holding my rows computed by peer p, in the order I sent them;
    they are written to their sorted positions in `y_sorted_MD`."""
    M = y_sorted_MD.shape[0]
    back_XD = jax.lax.all_to_all(y_recv_XD, axis_name, 0, 0, tiled=True) if axis_name else y_recv_XD
    row_R = jnp.arange(rows, dtype=jnp.int32)
    index_PR = jnp.where(row_R[None, :] < route.send_sizes[:, None], route.send_offsets[:, None] + row_R[None, :], M)
    return y_sorted_MD.at[index_PR.reshape(-1)].set(back_XD, mode="drop")
