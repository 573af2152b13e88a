"""The two transports that move routed rows to the devices owning their experts and back, inside shard_map.

Both see the same thing on every device of the expert-parallel group (size P), for one pipeline stage: a
buffer of rows sorted by destination (`x_sorted [M, D]`) and a `Route` of [P] int32 vectors derived from the
all-gathered per-expert counts. Neither drops a row.

ragged (GPU): `jax.lax.ragged_all_to_all` sends exactly the routed rows. The receive buffer holds the rows of
    source 0, then source 1, ... packed; its static size is P * rows_per_peer, where rows_per_peer (a static
    bound, see `rows_per_peer`) is the most rows one source can send one receiver in one stage, so it can never
    overflow. The return trip writes the rows straight back to their sorted positions at the source.
padded (CPU, any platform): `jax.lax.all_to_all` of a [P * rows_per_peer, D] buffer: peer p's slot holds the
    rows for p, then zeros. Dropless by the same bound. It moves P * rows_per_peer rows per device however
    few are routed, i.e. up to min(K, E_stage) * P / K times the ragged traffic, and holds a send and a receive
    buffer of P * rows_per_peer * D elements each (ragged: M * D and P * rows_per_peer * D).

On CPU, where XLA has no ragged_all_to_all, the ragged transport's offset arithmetic runs through
`sharding.ragged_emulation.ragged_all_to_all`: the collective's documented semantics from an all_gather (P times
the memory), poisoned (NaN) on any violated precondition.
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


def rows_per_peer(tokens: int, top_k: int, stage_experts: int) -> int:
    """The most rows one device can send one peer in one stage: each of its `tokens` tokens picks top_k distinct
    experts, and at most min(top_k, stage_experts) of them live on that peer in that stage."""
    return tokens * min(top_k, stage_experts)


def exclusive_cumsum(x, axis: int = 0):
    return jnp.cumsum(x, axis=axis) - x


# ragged: exactly the routed rows --------------------------------------------------------------------------------


def ragged_dispatch(x_sorted_MD, route: Route, recv_rows: int, axis_name, *, collective=None):
    """Sends my rows for each peer; returns the packed receive buffer [recv_rows, D] and where each source's
    rows start in it [P]."""
    collective = collective or jax.lax.ragged_all_to_all
    recv_RD = jnp.zeros((recv_rows, x_sorted_MD.shape[1]), x_sorted_MD.dtype)
    recv_RD = collective(x_sorted_MD, recv_RD, route.send_offsets, route.send_sizes, route.offsets_at_peer,
                         route.recv_sizes, axis_name=axis_name)
    return recv_RD, route.recv_offsets


def ragged_return(y_recv_RD, y_sorted_MD, route: Route, axis_name, *, collective=None):
    """Sends each source's computed rows back into its sorted buffer `y_sorted_MD` (rows of other stages kept)."""
    collective = collective or jax.lax.ragged_all_to_all
    return collective(y_recv_RD, y_sorted_MD, route.recv_offsets, route.recv_sizes, route.peer_send_offsets,
                      route.send_sizes, axis_name=axis_name)


# padded: fixed-size slots, one per peer ---------------------------------------------------------------------------


def padded_dispatch(x_sorted_MD, route: Route, rows: int, axis_name):
    """Slot p of the send buffer holds my rows for peer p, then zeros; all_to_all swaps slots. Returns the
    receive buffer [P * rows, D] (slot q from source q) and where each source's rows start in it [P]."""
    P = route.send_sizes.shape[0]
    M, D = x_sorted_MD.shape
    row_R = jnp.arange(rows, dtype=jnp.int32)
    index_PR = route.send_offsets[:, None] + row_R[None, :]
    valid_PR = row_R[None, :] < route.send_sizes[:, None]
    send_PRD = jnp.where(valid_PR[..., None], x_sorted_MD[jnp.clip(index_PR, 0, M - 1)], 0)
    send_XD = send_PRD.reshape(P * rows, D)
    recv_XD = jax.lax.all_to_all(send_XD, axis_name, 0, 0, tiled=True) if axis_name else send_XD
    return recv_XD, jnp.arange(P, dtype=jnp.int32) * rows


def padded_return(y_recv_XD, y_sorted_MD, route: Route, rows: int, axis_name):
    """The reverse all_to_all: slot p comes back holding my rows computed by peer p, in the order I sent them;
    they are written to their sorted positions in `y_sorted_MD`."""
    M = y_sorted_MD.shape[0]
    back_XD = jax.lax.all_to_all(y_recv_XD, axis_name, 0, 0, tiled=True) if axis_name else y_recv_XD
    row_R = jnp.arange(rows, dtype=jnp.int32)
    index_PR = jnp.where(row_R[None, :] < route.send_sizes[:, None], route.send_offsets[:, None] + row_R[None, :], M)
    return y_sorted_MD.at[index_PR.reshape(-1)].set(back_XD, mode="drop")
