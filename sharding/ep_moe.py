"""Expert parallelism over a mesh: the routed experts of one MoE layer in jax.shard_map, with EPS-MoE's pipeline.

On every device of the mesh (all axes manual), for its T_l tokens and its E_l = E / P local experts:

    sort the T_l*K (token, k) assignments by destination key              -- key = (stage, peer, expert)
    all_gather the per-key counts over the EP group                       -- one small collective per layer
    for each stage s (a group of local experts, or a chunk of tokens):
        dispatch_s: rows for each peer's stage-s experts -> that peer     -- ragged_all_to_all | all_to_all
        sort the received rows by local expert, expert FFN (group_offset = first expert of the stage)
        return_s: the rows go back to their sources' sorted positions     -- the reverse collective
    unsort, weight by the router, sum over k; psum over the expert-TP axes when the FFN dim is split

Stage s's dispatch depends only on the sort, and its return only on its own GEMMs, so nothing orders stage s's
collectives after stage s-1's GEMMs: XLA's scheduler is free to overlap them where collectives are asynchronous.

Which mesh axes play which part comes from a rules table (sharding/rules.py): experts -> the EP group,
expert_mlp -> tensor parallelism inside each expert, moe_tokens -> how the tokens are split. With no EP axes
this is the plain TP (or DP) expert compute, with the same code path minus the collectives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from sharding import ragged_emulation, transports
from sharding.expert_compute import MoEStats, combine
from sharding.errors import PlanError
from sharding.mesh import axis_size
from sharding.plan import ExpertPlan
from sharding.rules import Rules, check_mesh, get_rules

TRANSPORTS = ("auto", "ragged", "padded", "ragged_reference")


@dataclasses.dataclass(frozen=True)
class EPExperts:
    """ExpertCompute over `mesh` following a rule set's expert, expert_mlp and moe_tokens axes.

    transport: "ragged" (jax.lax.ragged_all_to_all; GPU), "padded" (jax.lax.all_to_all of dropless fixed-size
        slots; every platform), "ragged_reference" (the ragged arithmetic over sharding.ragged_emulation; for tests),
        or "auto": ragged on GPU, padded elsewhere.
    """

    mesh: Mesh
    rule_set: str | Rules = "dp_ep"
    plan: ExpertPlan = ExpertPlan()
    transport: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "rule_set", get_rules(self.rule_set))
        check_mesh(self.rule_set, self.mesh)
        if self.transport not in TRANSPORTS:
            raise PlanError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        platform = self.mesh.devices.flat[0].platform
        if self.transport == "ragged" and platform not in ("gpu", "cuda") and self.rule_set.expert_axes:
            raise PlanError(f"transport 'ragged' (jax.lax.ragged_all_to_all) needs GPU devices, and the mesh is "
                            f"{platform}: XLA:{platform.upper()} has no ragged all-to-all; use 'padded' or 'auto'")

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

    def __call__(self, x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T):
        rules, plan = self.rule_set, self.plan
        ep_axes, tp_axes, token_axes = rules.expert_axes, rules.expert_tensor_axes, rules.moe_token_axes
        E = w_gate_EDF.shape[0]
        ep = self.expert_parallel_size
        if E % ep:
            raise PlanError(f"{E} experts do not divide over the expert-parallel size {ep} (mesh axes {ep_axes})")
        groups = plan.expert_groups(E // ep)
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
        local = functools.partial(
            _ep_moe_shard, num_experts=E, ep_axes=ep_axes, ep_size=ep, tp_axes=tp_axes, token_axes=token_axes,
            groups=groups, chunks=plan.token_chunks, plan=plan, transport=self.resolved_transport)
        tokens = P(token_axes or None)
        experts_DF, experts_FD = P(ep_axes or None, None, tp_axes or None), P(ep_axes or None, tp_axes or None)
        moe = jax.shard_map(
            local, mesh=self.mesh, in_specs=(tokens, tokens, tokens, experts_DF, experts_DF, experts_FD, tokens),
            out_specs=(tokens, P()))
        y_TD, tokens_per_expert = moe(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T)
        y_TD = jax.lax.with_sharding_constraint(y_TD[:T], batch)
        return y_TD.astype(x_TD.dtype), MoEStats(tokens_per_expert=tokens_per_expert,
                                                 dropped=jnp.zeros((), jnp.int32))


def destination_keys(ep_size: int, local_experts: int, groups) -> np.ndarray:
    """key [E + 1] of each expert (and of the sentinel E, for invalid assignments): sorting by key orders the
    rows by stage, then destination peer, then expert, so each (stage, peer) block is contiguous."""
    keys = np.empty(ep_size * local_experts + 1, np.int32)
    for p in range(ep_size):
        for j0, j1 in groups:
            for j in range(j0, j1):
                keys[p * local_experts + j] = ep_size * j0 + p * (j1 - j0) + (j - j0)
    keys[-1] = ep_size * local_experts
    return keys


def _ep_moe_shard(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T, *, num_experts, ep_axes,
                  ep_size, tp_axes, token_axes, groups, chunks, plan: ExpertPlan, transport):
    """One device's part (see the module docstring). Shapes are local: T_l tokens, E_l experts, F_l FFN dim."""
    T_l, K = ids_TK.shape
    E, E_l, Pep = num_experts, w_gate_EDF.shape[0], ep_size
    me = jax.lax.axis_index(ep_axes) if ep_axes else 0
    ids_flat = jnp.where(jnp.repeat(valid_T, K), ids_TK.reshape(-1), E)  # [T_l*K], invalid -> sentinel E
    routed_E = jnp.zeros((E,), jnp.int32).at[ids_flat].add(1, mode="drop")
    tokens_per_expert = jax.lax.psum(routed_E, token_axes) if token_axes else routed_E

    # Sort each token chunk's assignments by destination key; one all_gather carries every chunk's counts.
    T_u, M = T_l // chunks, T_l // chunks * K
    keys_UM = jnp.asarray(destination_keys(Pep, E_l, groups))[ids_flat].reshape(chunks, M)
    order_UM = jnp.argsort(keys_UM, axis=1, stable=True)
    counts_UE = jax.vmap(lambda k: jnp.zeros((E + 1,), jnp.int32).at[k].add(1))(keys_UM)[:, :E]
    with jax.named_scope("ep_count_exchange"):
        counts_PUE = jax.lax.all_gather(counts_UE, ep_axes) if ep_axes else counts_UE[None]

    y_parts = []
    for u in range(chunks):
        x_sorted_MD = x_TD[u * T_u:(u + 1) * T_u][order_UM[u] // K]
        y_sorted_MD = jnp.zeros_like(x_sorted_MD)
        for s, (j0, j1) in enumerate(groups):
            stage = u * len(groups) + s
            route, recv_counts_PJ = stage_route(counts_PUE[:, u], me, j0, j1)
            rows = transports.rows_per_peer(T_u, K, j1 - j0)
            with jax.named_scope(f"ep_dispatch_{stage}"):
                if transport == "padded":
                    recv_XD, recv_start_P = transports.padded_dispatch(x_sorted_MD, route, rows, ep_axes)
                else:
                    recv_XD, recv_start_P = transports.ragged_dispatch(x_sorted_MD, route, Pep * rows, ep_axes,
                                                                       collective=_collective(transport))
            with jax.named_scope(f"ep_experts_{stage}"):
                y_recv_XD = _local_experts(recv_XD, recv_start_P, recv_counts_PJ, w_gate_EDF[j0:j1],
                                           w_up_EDF[j0:j1], w_down_EFD[j0:j1], group_offset=me * E_l + j0,
                                           num_experts=E, backend=plan.backend(stage), tiling=plan.tiling(stage))
            with jax.named_scope(f"ep_return_{stage}"):
                if transport == "padded":
                    y_sorted_MD = transports.padded_return(y_recv_XD, y_sorted_MD, route, rows, ep_axes)
                else:
                    y_sorted_MD = transports.ragged_return(y_recv_XD, y_sorted_MD, route, ep_axes,
                                                           collective=_collective(transport))
        y_parts.append(combine(y_sorted_MD, order_UM[u], weights_TK[u * T_u:(u + 1) * T_u]))
    y_TD = jnp.concatenate(y_parts) if chunks > 1 else y_parts[0]
    if tp_axes:
        y_TD = jax.lax.psum(y_TD, tp_axes)  # each expert-TP rank holds a partial sum over its FFN slice
    return y_TD, tokens_per_expert


def stage_route(counts_PE, me, j0: int, j1: int):
    """The Route of the stage holding local experts [j0, j1) at device `me`, and the rows it receives per
    (source, stage expert) [P, j1 - j0], from every source's per-key counts [P, E] (keys: `destination_keys`)."""
    Pep, E_s = counts_PE.shape[0], j1 - j0
    starts_PE = transports.exclusive_cumsum(counts_PE, axis=1)  # where each key's rows start, per source
    block_PPJ = counts_PE[:, Pep * j0:Pep * j1].reshape(Pep, Pep, E_s)  # [source, destination, expert]
    sent_PP = block_PPJ.sum(-1)
    route = transports.Route(
        send_offsets=starts_PE[me, Pep * j0 + jnp.arange(Pep) * E_s],
        send_sizes=sent_PP[me],
        recv_sizes=sent_PP[:, me],
        offsets_at_peer=transports.exclusive_cumsum(sent_PP, axis=0)[me],
        recv_offsets=transports.exclusive_cumsum(sent_PP[:, me]),
        peer_send_offsets=starts_PE[:, Pep * j0 + me * E_s])
    return route, block_PPJ[:, me, :]


def _collective(transport: str):
    return ragged_emulation.ragged_all_to_all if transport == "ragged_reference" else jax.lax.ragged_all_to_all


def _local_experts(recv_XD, recv_start_P, recv_counts_PJ, w_gate_JDF, w_up_JDF, w_down_JFD, *, group_offset,
                   num_experts, backend, tiling):
    """The stage's expert FFN on the received rows: source q's rows for expert j sit at recv_start[q] +
    (rows of q's experts < j); they are sorted by expert for the grouped kernel and put back afterwards."""
    X = recv_XD.shape[0]
    Pep, J = recv_counts_PJ.shape
    group_start = (recv_start_P[:, None] + transports.exclusive_cumsum(recv_counts_PJ, axis=1)).reshape(-1)
    group_end = group_start + recv_counts_PJ.reshape(-1)
    row_X = jnp.arange(X, dtype=jnp.int32)
    group_X = jnp.clip(jnp.searchsorted(group_start, row_X, side="right") - 1, 0, Pep * J - 1)
    received_X = (row_X >= group_start[group_X]) & (row_X < group_end[group_X])
    expert_X = jnp.where(received_X, group_X % J, J)  # J = not a received row
    perm_X = jnp.argsort(expert_X, stable=True)
    group_sizes_E = jax.lax.dynamic_update_slice(jnp.zeros((num_experts,), jnp.int32),
                                                 recv_counts_PJ.sum(0).astype(jnp.int32), (group_offset,))
    y_XD = pallas_kernels.expert_ffn(recv_XD[perm_X], w_gate_JDF, w_up_JDF, w_down_JFD, group_sizes_E,
                                     group_offset=group_offset, backend=backend, tiling=tiling)
    return jnp.zeros_like(y_XD).at[perm_X].set(y_XD)
