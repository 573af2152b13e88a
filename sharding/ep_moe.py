"""Expert parallelism over a mesh: the routed experts of one MoE layer in jax.shard_map, with EPS-MoE's pipeline.

On every device of the mesh (all axes manual), for its T_l tokens and its E_l = E / P local experts:

    one row per (token, destination): destination = (stage, peer) of each of the token's experts; a token whose
        k experts live on d distinct (stage, peer) pairs makes d rows, each carrying its experts' stage-local ids
        and router weights beside it                                       -- `token_rows`
    sort the rows by destination, all_gather the per-destination counts   -- one small collective per layer
    for each stage s (a group of local experts, or a chunk of tokens):
        dispatch_s: rows (and their ids/weights) for each peer's stage-s experts -> that peer
                                                                           -- ragged_all_to_all | all_to_all
        the peer runs each row's experts (sorted by expert for the grouped kernel, group_offset = first expert
        of the stage) and sums their outputs with the router weights: one output row per received row
        return_s: the rows go back to their sources' sorted positions     -- the reverse collective
    add each token's returned rows; psum over the expert-TP axes when the FFN dim is split

So the dispatch and the return move one row per (token, device) pair, not one per (token, k) assignment: under
DeepSeek-V2's device-limited routing (a token's top-6 experts in at most topk_group=3 groups, one group per
device) at most half of them. Stage s's dispatch depends only on the sort, and its return only on its own GEMMs,
so nothing orders stage s's collectives after stage s-1's GEMMs: XLA's scheduler is free to overlap them where
collectives are asynchronous. Stage s's expert work is ordered after stage s-1's (an optimization_barrier): left
free, XLA:GPU ran stage 1's sort of its received rows before stage 0's GEMMs, which made dispatch_1 finish first.

Which mesh axes play which part comes from a rules table (sharding/rules.py): experts -> the EP group,
expert_mlp -> tensor parallelism inside each expert, moe_tokens -> how the tokens are split. With no EP axes
this is the plain TP (or DP) expert compute, with the same code path minus the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from epsjax import pallas_kernels
from epsjax.sharding import ragged_emulation, transports
from epsjax.sharding.expert_compute import MoEStats
from epsjax.sharding.expert_placement import ExpertPlacement
from epsjax.sharding.errors import PlanError
from epsjax.sharding.mesh import axis_size
from epsjax.sharding.plan import ExpertPlan
from epsjax.sharding.rules import Rules, check_mesh, get_rules

TRANSPORTS = ("auto", "ragged", "padded")


@dataclasses.dataclass(frozen=True)
class EPExperts:
    """ExpertCompute over `mesh` following a rule set's expert, expert_mlp and moe_tokens axes.

    placement: where the experts live (sharding.expert_placement: any expert count, hot-expert replicas); default
        the contiguous layout of the weights' experts over the EP devices.
    transport: "ragged" (jax.lax.ragged_all_to_all; GPU; on CPU inside sharding.ragged_emulation.emulated_on_cpu(),
        for tests), "padded" (jax.lax.all_to_all of dropless fixed-size slots; every platform), or "auto": ragged on
        GPU, padded elsewhere.
    """

    mesh: Mesh
    rule_set: str | Rules = "dp_ep"
    plan: ExpertPlan = ExpertPlan()
    transport: str = "auto"
    placement: ExpertPlacement | None = None

    def __post_init__(self):
        object.__setattr__(self, "rule_set", get_rules(self.rule_set))
        check_mesh(self.rule_set, self.mesh)
        if self.transport not in TRANSPORTS:
            raise PlanError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        platform = self.mesh.devices.flat[0].platform
        if (self.transport == "ragged" and platform not in ("gpu", "cuda") and self.rule_set.expert_axes
                and not (platform == "cpu" and ragged_emulation.installed())):
            raise PlanError(f"transport 'ragged' (jax.lax.ragged_all_to_all) needs GPU devices, and the mesh is "
                            f"{platform}: XLA:{platform.upper()} has no ragged all-to-all; use 'padded' or 'auto' "
                            f"(tests can emulate it: sharding.ragged_emulation.emulated_on_cpu())")

    @property
    def resolved_transport(self) -> str:
        if not self.rule_set.expert_axes:
            return "padded"  # no expert parallelism: the padded path with its collectives left out
        if self.transport == "auto":
            return "ragged" if self.mesh.devices.flat[0].platform in ("gpu", "cuda") else "padded"
        return self.transport

    @property
    def compiler_options(self) -> dict:
        """XLA options for the programs that run this layer (jax.jit's compiler_options). On a GPU mesh (seen in
        XLA:GPU's schedule by scripts/aot_check.py, jax 0.11.2):

        - the latency-hiding scheduler: without it every collective stays synchronous, so no stage's
          all-to-all overlaps another stage's GEMMs;
        - two collectives in flight: with one, the scheduler serialises the dispatches of stages 1..PN-2
          before stage 0's GEMMs; with two, stage s's return and stage s+2's dispatch both overlap stage s+1's
          GEMMs, EPS-MoE's pipeline.
        """
        if self.mesh.devices.flat[0].platform in ("gpu", "cuda"):
            return {"xla_gpu_enable_latency_hiding_scheduler": True,
                    "xla_gpu_experimental_parallel_collective_overlap_limit": 2}
        return {}

    @property
    def expert_parallel_size(self) -> int:
        return axis_size(self.mesh, self.rule_set.expert_axes)

    def expert_placement(self, rows: int) -> ExpertPlacement:
        """Where the experts live, given expert weights with `rows` rows: `placement` if set (the weights are
        either in its slot order or the canonical [E, ...] stacking, copied into slot order on every call), else the
        contiguous layout of `rows` experts (floor or ceil of E / P per device)."""
        placement = self.placement or ExpertPlacement(rows, self.expert_parallel_size)
        if placement.devices != self.expert_parallel_size:
            raise PlanError(f"the expert placement spreads experts over {placement.devices} devices, but the "
                            f"expert-parallel size is {self.expert_parallel_size}")
        if rows not in (placement.num_experts, placement.num_slots):
            raise PlanError(f"expert weights have {rows} rows; the expert placement expects {placement.num_experts} "
                            f"experts or {placement.num_slots} slots")
        return placement

    def __call__(self, x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T):
        rules, plan = self.rule_set, self.plan
        ep_axes, tp_axes, token_axes = rules.expert_axes, rules.expert_tensor_axes, rules.moe_token_axes
        ep = self.expert_parallel_size
        if not isinstance(w_gate_EDF, jax.Array):
            raise PlanError(f"the expert-parallel MoE takes float expert weights; got {type(w_gate_EDF).__name__} "
                            f"(quantized experts run on one device for now)")
        placement = self.expert_placement(w_gate_EDF.shape[0])
        if w_gate_EDF.shape[0] != placement.num_slots:  # canonical [E, ...] weights, not in slot order: copy them
            w_gate_EDF, w_up_EDF, w_down_EFD = (placement.to_slots(w) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
        slots = placement.num_slots
        groups = plan.expert_groups(placement.slots)
        # The model around the MoE keeps its tokens split as its batch is, in and out (without this, a split over
        # an axis only the MoE uses, e.g. tp_ep's "tensor", propagates into attention and the KV cache, and the
        # decode step's cache scatters then abort XLA's SPMD partitioner on mismatched device groups).
        batch = NamedSharding(self.mesh, P(rules.batch_axes or None))
        x_TD, ids_TK, weights_TK, valid_T = (jax.lax.with_sharding_constraint(a, batch)
                                             for a in (x_TD, ids_TK, weights_TK, valid_T))
        # Pad the tokens to a multiple of (token shards x token chunks): padding rows are invalid, never routed.
        T = x_TD.shape[0]
        pad = -T % (axis_size(self.mesh, token_axes) * plan.token_chunks)
        if pad:
            x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
            ids_TK = jnp.pad(ids_TK, ((0, pad), (0, 0)))
            weights_TK = jnp.pad(weights_TK, ((0, pad), (0, 0)))
            valid_T = jnp.pad(valid_T, (0, pad))
        if not placement.identity:
            ids_TK = jax.lax.with_sharding_constraint(placement.slot_ids(ids_TK), batch)
        local = functools.partial(
            _ep_moe_shard, num_experts=slots, ep_axes=ep_axes, ep_size=ep, tp_axes=tp_axes, token_axes=token_axes,
            groups=groups, chunks=plan.token_chunks, plan=plan, transport=self.resolved_transport)
        tokens = P(token_axes or None)
        experts_DF, experts_FD = P(ep_axes or None, None, tp_axes or None), P(ep_axes or None, tp_axes or None)
        moe = jax.shard_map(
            local, mesh=self.mesh, in_specs=(tokens, tokens, tokens, experts_DF, experts_DF, experts_FD, tokens),
            out_specs=(tokens, P()))
        y_TD, tokens_per_slot = moe(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T)
        tokens_per_expert = tokens_per_slot if placement.identity else placement.per_expert(tokens_per_slot)
        y_TD = jax.lax.with_sharding_constraint(y_TD[:T], batch)
        return y_TD.astype(x_TD.dtype), MoEStats(tokens_per_expert=tokens_per_expert,
                                                 dropped=jnp.zeros((), jnp.int32))


def device_reach(num_experts: int, ep_size: int, top_k: int, n_group: int = 1, topk_group: int = 1) -> tuple[
        int, str]:
    """The most devices one token's experts can be on (so the most rows it makes per stage without expert-group
    stages), and a line saying why: device p owns experts [p * E / P, (p + 1) * E / P), and with DeepSeek's group
    limits (a token's experts in its topk_group best of n_group contiguous groups) whether groups line up with
    devices."""
    E, P, K = num_experts, ep_size, top_k
    if n_group <= 1 or topk_group >= n_group:
        return min(K, P), f"top-{K} over {P} devices: up to {min(K, P)} rows per token"
    if n_group % P == 0:
        reach = min(topk_group, P, K)
        return reach, (f"group-limited routing: {n_group // P} whole group(s) of {E // n_group} experts per device, "
                       f"so a token reaches at most topk_group={topk_group} -> {reach} device(s)")
    if P % n_group == 0:
        reach = min(topk_group * (P // n_group), K, P)
        return reach, (f"group-limited routing: each of the {n_group} groups spans {P // n_group} devices, so a "
                       f"token reaches up to {reach} devices; groups do not line up with devices (an EP size "
                       f"dividing n_group={n_group} gives at most {min(topk_group, K)})")
    per_device, per_group = E / P, E / n_group
    spans = math.ceil(per_group / per_device) + 1
    reach = min(topk_group * spans, K, P)
    return reach, (f"group-limited routing: {n_group} groups of {E // n_group} experts straddle the {P} devices' "
                   f"blocks of {E // P}, so a token may reach up to {reach} devices; the groups do not line up "
                   f"with the devices (an EP size dividing n_group={n_group} gives at most {min(topk_group, K)})")


def destination_of_experts(ep_size: int, local_experts: int, groups) -> tuple[np.ndarray, np.ndarray]:
    """For every expert (and the sentinel E, for invalid assignments): its destination [E + 1] = stage * P + peer
    (sentinel: stages * P), and its index among its stage's experts on that peer [E + 1] (sentinel: -1). Sorting
    rows by destination orders them by stage, then peer, so each (stage, peer) block is contiguous."""
    S = len(groups)
    destination = np.full(ep_size * local_experts + 1, S * ep_size, np.int32)
    stage_index = np.full(ep_size * local_experts + 1, -1, np.int32)
    for p in range(ep_size):
        for s, (j0, j1) in enumerate(groups):
            for j in range(j0, j1):
                destination[p * local_experts + j] = s * ep_size + p
                stage_index[p * local_experts + j] = j - j0
    return destination, stage_index


def token_rows(ids_TK, weights_TK, valid_T, destination_E1, stage_index_E1, width: int):
    """One row per (token, destination) its experts reach: row (t, k) stands for the destination of ids[t, k] if
    k is the first of the token's choices to reach it; otherwise it is unused (its destination is the sentinel).

    Returns each row's destination [T, K], and what travels with it: the stage-local ids of the token's experts at
    that destination [T, K, width] (-1 where none; valid entries first) and their router weights [T, K, width]
    (0 where none); and the expert of each (token, expert) entry [T, K] (E where k repeats an earlier choice or
    the token is invalid), whose counts per expert are the receivers' group sizes. An expert a token chose twice
    is one entry with the two weights summed (the same sum), so a row holds at most width = min(K, experts per
    stage) entries whatever the ids.
    """
    T, K = ids_TK.shape
    sentinel = destination_E1[-1]
    ids_TK = jnp.where(valid_T[:, None], ids_TK, destination_E1.shape[0] - 1)
    dest_TK = destination_E1[ids_TK]
    earlier_KK = jnp.arange(K)[None, :] < jnp.arange(K)[:, None]            # [k, k']: k' comes before k
    same_dest_TKK = dest_TK[:, :, None] == dest_TK[:, None, :]
    same_id_TKK = ids_TK[:, :, None] == ids_TK[:, None, :]
    first_dest_TK = ~jnp.any(same_dest_TKK & earlier_KK[None], axis=2)
    first_id_TK = ~jnp.any(same_id_TKK & earlier_KK[None], axis=2)
    # a sum, not an einsum: a GPU matmul of float32 may round through TF32
    weight_TK = jnp.sum(jnp.where(same_id_TKK, weights_TK.astype(jnp.float32)[:, None, :], 0.0), axis=2)
    row_dest_TK = jnp.where(first_dest_TK & (dest_TK != sentinel), dest_TK, sentinel)
    # Entry k' of row k: k' reaches the row's destination and is the first choice of its expert.
    member_TKK = same_dest_TKK & (row_dest_TK != sentinel)[:, :, None] & first_id_TK[:, None, :]
    order_TKW = jnp.argsort(~member_TKK, axis=2, stable=True)[:, :, :width]  # the row's entries first
    member_TKW = jnp.take_along_axis(member_TKK, order_TKW, axis=2)

    def entries(values_TK):
        return jnp.take_along_axis(jnp.broadcast_to(values_TK[:, None, :], (T, K, K)), order_TKW, axis=2)

    local_TKW = jnp.where(member_TKW, entries(stage_index_E1[ids_TK]), -1)
    weight_TKW = jnp.where(member_TKW, entries(weight_TK), 0.0)
    entry_ids_TK = jnp.where(first_id_TK & (dest_TK != sentinel), ids_TK, destination_E1.shape[0] - 1)
    return row_dest_TK, local_TKW, weight_TKW, entry_ids_TK


def _ep_moe_shard(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T, *, num_experts, ep_axes,
                  ep_size, tp_axes, token_axes, groups, chunks, plan: ExpertPlan, transport):
    """One device's part (see the module docstring). Shapes are local: T_l tokens, E_l experts, F_l FFN dim."""
    (T_l, K), D = ids_TK.shape, x_TD.shape[1]
    E, E_l, Pep, S = num_experts, w_gate_EDF.shape[0], ep_size, len(groups)
    me = jax.lax.axis_index(ep_axes) if ep_axes else 0
    ids_flat = jnp.where(jnp.repeat(valid_T, K), ids_TK.reshape(-1), E)  # [T_l*K], invalid -> sentinel E
    routed_E = jnp.zeros((E,), jnp.int32).at[ids_flat].add(1, mode="drop")
    tokens_per_expert = jax.lax.psum(routed_E, token_axes) if token_axes else routed_E

    destination, stage_index = (jnp.asarray(a) for a in destination_of_experts(Pep, E_l, groups))
    width = min(K, max(j1 - j0 for j0, j1 in groups))
    dest_TK, local_TKW, weight_TKW, entry_ids_TK = token_rows(ids_TK, weights_TK, valid_T, destination, stage_index,
                                                              width)
    # What travels with a row: its experts' stage-local ids + 1 (0: none) and router weights, as int32 words.
    meta_TKC = jnp.concatenate([local_TKW + 1, jax.lax.bitcast_convert_type(weight_TKW, jnp.int32)], axis=2)

    # Sort each token chunk's rows by destination; one all_gather carries every chunk's counts.
    T_u, M = T_l // chunks, T_l // chunks * K
    dest_UM = dest_TK.reshape(chunks, M)
    order_UM = jnp.argsort(dest_UM, axis=1, stable=True)
    counts_UX = jax.vmap(lambda d: jnp.zeros((S * Pep + 1,), jnp.int32).at[d].add(1))(dest_UM)[:, :S * Pep]
    # Entries per expert: each receiver's group sizes come from this exchange, not from the rows it receives, so a
    # stage's GEMMs depend on its own dispatch only (XLA fuses sibling computations of different stages).
    entries_UE = jax.vmap(lambda e: jnp.zeros((E + 1,), jnp.int32).at[e].add(1))(
        entry_ids_TK.reshape(chunks, M))[:, :E]
    with jax.named_scope("ep_count_exchange"):
        both_UC = jnp.concatenate([counts_UX, entries_UE], axis=1)
        both_PUC = jax.lax.all_gather(both_UC, ep_axes) if ep_axes else both_UC[None]
        counts_PUX, entries_PUE = both_PUC[..., :S * Pep], both_PUC[..., S * Pep:]

    y_parts, y_previous = [], None
    for u in range(chunks):
        rows_M = order_UM[u] // K  # the chunk-local token of each sorted row
        # One buffer of int32 words per row (the token's hidden state, then its metadata): one collective each way.
        packed_MC = jnp.concatenate([to_words(x_TD[u * T_u:(u + 1) * T_u][rows_M]),
                                     meta_TKC[u * T_u:(u + 1) * T_u].reshape(M, -1)[order_UM[u]]], axis=1)
        y_sorted_MD = transports.varying(jnp.zeros((M, D), x_TD.dtype), ep_axes)
        for s, (j0, j1) in enumerate(groups):
            stage = u * S + s
            route = stage_route(counts_PUX[:, u], me, s)
            rows = transports.rows_per_peer(T_u)
            with jax.named_scope(f"ep_dispatch_{stage}"):
                if transport == "padded":
                    recv_XC, _ = transports.padded_dispatch(packed_MC, route, rows, ep_axes)
                else:
                    recv_XC, _ = transports.ragged_dispatch(packed_MC, route, Pep * rows, ep_axes)
            if y_previous is not None:
                # The pipeline's order: stage s's experts run after stage s-1's, so that on a GPU stage s's dispatch
                # stays in flight behind stage s-1's GEMMs. Without this, XLA:GPU's scheduler may run the (cheap)
                # work between stage s's dispatch and its GEMMs first, which needs that dispatch done.
                recv_XC, _ = jax.lax.optimization_barrier((recv_XC, y_previous))
            with jax.named_scope(f"ep_experts_{stage}"):
                # Rows not received are zero words: no experts (id 0 = none), a zero state.
                recv_XD = from_words(recv_XC[:, :-2 * width], D, x_TD.dtype)
                local_XW = recv_XC[:, -2 * width:-width] - 1
                weight_XW = jax.lax.bitcast_convert_type(recv_XC[:, -width:], jnp.float32)
                group_sizes_J = jax.lax.dynamic_slice_in_dim(entries_PUE[:, u].sum(0), me * E_l + j0, j1 - j0)
                y_recv_XD = _local_experts(recv_XD, local_XW, weight_XW, group_sizes_J, w_gate_EDF[j0:j1],
                                           w_up_EDF[j0:j1], w_down_EFD[j0:j1], group_offset=me * E_l + j0,
                                           num_experts=E, backend=plan.backend(stage), tiling=plan.tiling(stage))
                y_previous = y_recv_XD
            with jax.named_scope(f"ep_return_{stage}"):
                if transport == "padded":
                    y_sorted_MD = transports.padded_return(y_recv_XD, y_sorted_MD, route, rows, ep_axes)
                else:
                    y_sorted_MD = transports.ragged_return(y_recv_XD, y_sorted_MD, route, ep_axes)
        # Each row came back as the weighted sum of its token's experts at one destination: add them per token.
        y_parts.append(jnp.zeros((T_u, x_TD.shape[1]), jnp.float32).at[rows_M].add(y_sorted_MD.astype(jnp.float32)))
    y_TD = jnp.concatenate(y_parts) if chunks > 1 else y_parts[0]
    if tp_axes:
        y_TD = jax.lax.psum(y_TD, tp_axes)  # each expert-TP rank holds a partial sum over its FFN slice
    return y_TD, tokens_per_expert


def to_words(x_MD):
    """x [M, D] (16- or 32-bit) as int32 words [M, ceil(D * itemsize / 4)], bit for bit."""
    M, D = x_MD.shape
    itemsize = jnp.dtype(x_MD.dtype).itemsize
    if itemsize == 4:
        return jax.lax.bitcast_convert_type(x_MD, jnp.int32)
    if itemsize != 2:
        raise PlanError(f"the expert-parallel dispatch moves 16- or 32-bit hidden states, got {x_MD.dtype}")
    x_MD = jnp.pad(x_MD, ((0, 0), (0, D % 2)))
    return jax.lax.bitcast_convert_type(x_MD.reshape(M, -1, 2), jnp.int32)


def from_words(words_MW, D: int, dtype):
    """The inverse of to_words: [M, D] of `dtype`."""
    M = words_MW.shape[0]
    if jnp.dtype(dtype).itemsize == 4:
        return jax.lax.bitcast_convert_type(words_MW, dtype)
    return jax.lax.bitcast_convert_type(words_MW, dtype).reshape(M, -1)[:, :D]


def stage_route(counts_PX, me, stage: int):
    """The Route of pipeline stage `stage` at device `me`, from every source's rows per destination [P, S * P]
    (destination = stage * P + peer: `destination_of_experts`)."""
    Pep = counts_PX.shape[0]
    starts_PX = transports.exclusive_cumsum(counts_PX, axis=1)  # where each destination's rows start, per source
    sent_PP = counts_PX[:, stage * Pep:(stage + 1) * Pep]  # [source, destination]
    return transports.Route(
        send_offsets=starts_PX[me, stage * Pep:(stage + 1) * Pep],
        send_sizes=sent_PP[me],
        recv_sizes=sent_PP[:, me],
        offsets_at_peer=transports.exclusive_cumsum(sent_PP, axis=0)[me],
        recv_offsets=transports.exclusive_cumsum(sent_PP[:, me]),
        peer_send_offsets=starts_PX[:, stage * Pep + me])


def _local_experts(recv_XD, local_XW, weight_XW, group_sizes_J, w_gate_JDF, w_up_JDF, w_down_JFD, *, group_offset,
                   num_experts, backend, tiling):
    """The stage's expert FFN on the received rows: row x runs the stage's experts local_XW[x] (-1: none) and
    returns their outputs summed with the router weights weight_XW[x]. The (row, expert) entries are sorted by
    expert for the grouped kernel; group_sizes_J [J] counts them per expert (from the count exchange)."""
    X, W = local_XW.shape
    J = w_gate_JDF.shape[0]
    expert_N = jnp.where(local_XW >= 0, local_XW, J).reshape(-1)  # N = X*W entries, J = none
    perm_N = jnp.argsort(expert_N, stable=True)
    group_sizes_E = jax.lax.dynamic_update_slice(jnp.zeros((num_experts,), jnp.int32), group_sizes_J,
                                                 (group_offset,))
    row_N = perm_N // W
    y_ND = pallas_kernels.expert_ffn(recv_XD[row_N], w_gate_JDF, w_up_JDF, w_down_JFD, group_sizes_E,
                                     group_offset=group_offset, backend=backend, tiling=tiling)
    used_N = expert_N[perm_N] < J
    # where, not a product: a row past the groups may hold anything, and NaN * 0 is NaN.
    y_ND = jnp.where(used_N[:, None], y_ND.astype(jnp.float32) * weight_XW.reshape(-1)[perm_N][:, None], 0.0)
    return jnp.zeros((X, recv_XD.shape[1]), jnp.float32).at[row_N].add(y_ND).astype(recv_XD.dtype)
