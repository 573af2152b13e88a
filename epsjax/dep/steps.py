"""The jitted programs of a DEP step, one per task kind, each on one group's mesh.

Attention group (mesh "data" axis = ag devices, micro-batch [ag * ma, T] split over it, weights replicated):

    embed      tokens -> x                                                    MoETransformer.embed
    dense      a dense layer, whole (and its KV cache)                        DecoderLayer.__call__
    attention  x -> h (writing the layer's KV cache), moe input, routing   DecoderLayer.attention, .moe_input,
               MoEBlock.route; then (sort_rows), per device, the T_l * K rows sorted by (expert device, segment,
               slot) with their counts [ag, eg, r2, slots]
    shared     the shared experts on the moe input                            MoEBlock.add_shared(x, 0)
    combine    returned rows -> un-sorted, weighted by the router (per device), + shared -> layer output
               sharding.expert_compute.combine, DecoderLayer.moe_output
    head       last norm + LM head                                            MoETransformer.logits

A prefill and a decode step run the same programs (decode: one new token per sequence attending to the cache);
the attention group keeps each micro-batch's KV cache, [ag * ma, S, ...] split like the micro-batch.

Expert group (mesh "expert" axis = eg devices, expert weights [eg * slots, D, F] split over it):

    experts    per device (shard_map): the received rows of one segment in (source, slot) order -> sorted by
               slot -> pallas_kernels.expert_ffn over the device's slots -> back to (source, slot) order

The model's own methods do the work; nothing here re-implements a layer. Parameters come in as nnx states
(graphdef static), the routed expert weights of an attention-group layer as zero-size placeholders.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from epsjax import pallas_kernels
from epsjax.models.attention import AttentionContext
from epsjax.models.moe import LocalExperts
from epsjax.sharding import DATA, EXPERT
from epsjax.sharding.expert_compute import combine


def _context(positions_BT, mask_BTS, write_index_B, decode: bool) -> AttentionContext:
    """A prefill (the prompt attends to itself, causal) or a decode step (the new token attends to the cache), as
    the Engine's forward builds it; each row writes its cache at its own write_index_B."""
    return AttentionContext(positions_BT=positions_BT, mask_BTS=mask_BTS, write_index=write_index_B,
                            attend_to_cache=decode, causal=not decode)


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


@dataclasses.dataclass(frozen=True)
class Pack:
    """Sorts one attention device's routed rows by destination: key = (expert device, segment, slot)."""

    owner: tuple[int, ...]   # [E] expert device of each expert
    slot: tuple[int, ...]    # [E] slot of each expert on its device
    devices: int             # eg
    slots: int
    segments: int            # r2

    def __call__(self, x_TD, ids_TK, valid_T):
        """Local [T, D], [T, K], [T] -> sorted rows [T*K, D], order [T*K], counts [1, eg, r2, slots]."""
        T, K = ids_TK.shape
        keys = self.devices * self.segments * self.slots                  # the sentinel key of invalid rows
        # r2 contiguous segments of the valid tokens, equal up to one token: split by position, left padding
        # (which routes nothing) would leave the first segments empty and nothing to pipeline
        rank_T = jnp.cumsum(valid_T.astype(jnp.int32)) - 1
        segment_T = (rank_T * self.segments) // jnp.maximum(jnp.sum(valid_T.astype(jnp.int32)), 1)
        owner_E, slot_E = jnp.asarray(self.owner, jnp.int32), jnp.asarray(self.slot, jnp.int32)
        key_TK = (owner_E[ids_TK] * self.segments + segment_T[:, None]) * self.slots + slot_E[ids_TK]
        key_M = jnp.where(valid_T[:, None], key_TK, keys).reshape(-1)     # [T*K]
        order_M = jnp.argsort(key_M, stable=True)
        x_sorted_MD = x_TD[order_M // K]
        counts = jnp.zeros((keys + 1,), jnp.int32).at[key_M].add(1)[:keys]
        return x_sorted_MD, order_M, counts.reshape(1, self.devices, self.segments, self.slots)


@dataclasses.dataclass(frozen=True)
class ExpertStep:
    """One segment's grouped expert FFN on every expert device (see the module docstring)."""

    mesh: Mesh
    backend: str = "auto"

    def __call__(self, w_gate, w_up, w_down, rows_XD, counts_EAS):
        spec_w, spec_rows = P(EXPERT, None, None), P(EXPERT)
        return jax.shard_map(self._local, mesh=self.mesh, in_specs=(spec_w, spec_w, spec_w, spec_rows, spec_rows),
                             out_specs=spec_rows, check_vma=False)(w_gate, w_up, w_down, rows_XD, counts_EAS)

    def _local(self, w_gate_SDF, w_up_SDF, w_down_SFD, rows_RD, counts_1AS):
        R = rows_RD.shape[0]
        counts_AS = counts_1AS[0]                     # rows from source a for slot s, stored (source, slot)-major
        A, S = counts_AS.shape
        start_G = _exclusive_cumsum(counts_AS.reshape(-1))
        end_G = start_G + counts_AS.reshape(-1)
        row_R = jnp.arange(R, dtype=jnp.int32)
        # The (source, slot) group of each row: the last group starting at or before it (empty groups share their
        # start with the next one, so "last" picks the non-empty one); rows past the end are padding.
        group_R = jnp.clip(jnp.searchsorted(start_G, row_R, side="right") - 1, 0, A * S - 1)
        slot_R = jnp.where(row_R < end_G[group_R], group_R % S, S)
        perm_R = jnp.argsort(slot_R, stable=True)
        with jax.named_scope("dep_routed_experts"):
            y_RD = pallas_kernels.expert_ffn(rows_RD[perm_R], w_gate_SDF, w_up_SDF, w_down_SFD,
                                             counts_AS.sum(0).astype(jnp.int32), backend=self.backend)
        return jnp.zeros_like(y_RD).at[perm_R].set(y_RD)


# Attention group ------------------------------------------------------------------------------------------------
#
# Every program is a shard_map over the attention mesh: parameters replicated (P()), the micro-batch split over
# "data" (P(DATA)), each device running the model's code on its own sequences. No collective appears: left to
# jit's partitioner, MoEBlock.route on a batch-sharded input all-gathers every device's router probabilities for
# one global top-k, and on the CPU client a program with collectives also waits for programs before it, which
# serialized the two groups.

def _data_parallel(mesh, body, replicated, batched):
    """body(*replicated, *batched) on each attention device: replicated args whole, batched ones split."""
    return jax.shard_map(body, mesh=mesh, in_specs=(P(),) * len(replicated) + (P(DATA),) * len(batched),
                         out_specs=P(DATA), check_vma=False)(*replicated, *batched)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def embed(graphdef, layers, top, tokens_BT, *, mesh):
    return _data_parallel(mesh, lambda ls, ts, tokens: nnx.merge(graphdef, ls, ts).embed(tokens), (layers, top),
                          (tokens_BT,))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "last_only"))
def head(graphdef, layers, top, x_BTD, *, mesh, last_only: bool = False):
    return _data_parallel(mesh, lambda ls, ts, x: nnx.merge(graphdef, ls, ts).logits(x, last_logits_only=last_only),
                          (layers, top), (x_BTD,))


# A layer's attention reads the micro-batch's step inputs: positions [B, T], the attention mask [B, T, S]
# (engine.prefill_inputs / decode_inputs) and its KV cache [B, S, ...] (None: no cache), which it updates at each
# row's write_index_B [B] (split like the rows: every row is a decode slot of its own length; the cache is
# donated); decode (static): the new tokens attend to the cache.

@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "decode"), donate_argnames=("cache_layer",))
def dense(graphdef, state, x_BTD, positions_BT, valid_BT, mask_BTS, cache_layer, write_index_B, *, mesh,
          decode: bool):
    def body(state, x_BTD, positions_BT, valid_BT, mask_BTS, cache_layer, write_index_B):
        layer = nnx.merge(graphdef, state)
        ctx = _context(positions_BT, mask_BTS, write_index_B, decode)
        out_BTD, cache_layer, _ = layer(x_BTD, valid_BT, ctx, cache_layer, LocalExperts())
        return out_BTD, cache_layer

    return _data_parallel(mesh, body, (state,),
                          (x_BTD, positions_BT, valid_BT, mask_BTS, cache_layer, write_index_B))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "decode"), donate_argnames=("cache_layer",))
def attention(graphdef, experts, rest, x_BTD, positions_BT, mask_BTS, cache_layer, write_index_B, *, mesh,
              decode: bool):
    def body(experts, rest, x_BTD, positions_BT, mask_BTS, cache_layer, write_index_B):
        layer = nnx.merge(graphdef, experts, rest)
        return layer.attend_route(x_BTD, _context(positions_BT, mask_BTS, write_index_B, decode), cache_layer)

    return _data_parallel(mesh, body, (experts, rest), (x_BTD, positions_BT, mask_BTS, cache_layer, write_index_B))


@functools.partial(jax.jit, static_argnames=("mesh", "pack"))
def sort_rows(moe_in_BTD, ids_TK, valid_BT, *, mesh, pack: Pack):
    """Per attention device, the routed rows sorted by (expert device, segment, slot) and their counts (a program
    of its own, so the attention compiles once whatever the schedule's segments)."""
    def body(moe_in_BTD, ids_TK, valid_BT):
        B, T, D = moe_in_BTD.shape
        return pack(moe_in_BTD.reshape(B * T, D), ids_TK, valid_BT.reshape(B * T))

    return _data_parallel(mesh, body, (), (moe_in_BTD, ids_TK, valid_BT))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def shared(graphdef, experts, rest, moe_in_BTD, *, mesh):
    def body(experts, rest, moe_in_BTD):
        layer = nnx.merge(graphdef, experts, rest)
        return layer.moe.add_shared(moe_in_BTD, jnp.zeros_like(moe_in_BTD))  # = shared experts(moe_in)

    return _data_parallel(mesh, body, (experts, rest), (moe_in_BTD,))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def combine_layer(graphdef, experts, rest, h_BTD, shared_BTD, y_sorted_MD, order_M, weights_TK, *, mesh):
    """The layer's output: as MoEBlock.__call__ (routed output in the input dtype, plus the shared experts')
    and DecoderLayer.moe_output."""
    def body(experts, rest, h_BTD, shared_BTD, y_sorted_MD, order_M, weights_TK):
        layer = nnx.merge(graphdef, experts, rest)
        y_BTD = combine(y_sorted_MD, order_M, weights_TK).astype(h_BTD.dtype).reshape(h_BTD.shape)
        moe_BTD = y_BTD if shared_BTD is None else y_BTD + shared_BTD
        return layer.moe_output(h_BTD, moe_BTD)

    return _data_parallel(mesh, body, (experts, rest), (h_BTD, shared_BTD, y_sorted_MD, order_M, weights_TK))


# Expert group ---------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("step",))
def experts(w_gate, w_up, w_down, rows_XD, counts_EAS, *, step: ExpertStep):
    return step(w_gate, w_up, w_down, rows_XD, counts_EAS)
