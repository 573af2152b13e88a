"""The jitted executor: the whole model as one program per step (one device, and every mesh strategy with its
expert compute, the EPS-MoE pipeline included), and `Engine`, the generator (epsjax.generation) over it.

Prompts of different lengths are left-padded into one batch: padding slots are masked out of attention and of
the MoE (no expert computes a padding token), and rotary positions count real tokens only, as transformers does.
A decode state is a set of slots, each with its own write position: rows are inserted (`insert`) and released
(`release`) while the others decode. Bad requests raise RequestError before anything runs (epsjax.generation).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epsjax.compilation import ShapeBuckets
from epsjax.generation import (DECODE_CHUNK, SEED_LIMIT, GenerateResult, Generator, RequestError, SamplingParams,
                               SlotRows, advance, sample)
from epsjax.models import ExpertCompute, LocalExperts, MoEStats, MoETransformer
from epsjax.models.transformer import decode_mask, prefill_mask

__all__ = ["DECODE_CHUNK", "SEED_LIMIT", "DecodeState", "Engine", "GenerateResult", "JitExecutor", "RequestError",
           "SamplingParams", "SlotRows", "sample"]


@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: list[dict]          # per layer, [B, S, ...] each
    kv_valid_BS: jax.Array     # [B, S] bool: slots holding real tokens
    next_position_B: jax.Array  # [B] int32 rotary position of the next token
    write_index_B: jax.Array   # [B] int32 each row's next cache slot (rows are decode slots of their own length)
    active_B: jax.Array        # [B] bool: rows holding a request (False: batch padding or a free slot: no compute
                               # reaches the experts)


jax.tree_util.register_dataclass(
    DecodeState, data_fields=["cache", "kv_valid_BS", "next_position_B", "write_index_B", "active_B"],
    meta_fields=[])


def cache_shape(state: DecodeState) -> tuple[int, int]:
    """[slots, cache length] of a decode state."""
    return tuple(state.kv_valid_BS.shape)


def longest(state: DecodeState) -> int:
    """The largest write position among the live rows (0 when none is live)."""
    write_B, active_B = np.asarray(state.write_index_B), np.asarray(state.active_B)
    return int(write_B[active_B].max()) if active_B.any() else 0


class JitExecutor:
    """The model split into a graph and parameters, with jitted prefill, decode step, on-device decode loop, and
    slot insert / release (epsjax.generation's executor contract).

    experts: how the routed experts run (default: all on this device, load-aware kernel selection).
    batch_sharding: optional sharding for [B, ...] inputs (e.g. data parallel over a mesh's "data" axis).
    """

    def __init__(self, model: MoETransformer, *, experts: ExpertCompute = LocalExperts(),
                 batch_sharding: jax.sharding.Sharding | None = None):
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.experts = experts
        self.batch_sharding = batch_sharding
        self.batch_multiple = _batch_multiple(batch_sharding)
        options = compiler_options(experts)
        self._prefill = jax.jit(_prefill, static_argnames=_PREFILL_STATIC, compiler_options=options)
        self._step = jax.jit(_decode_step, static_argnames=("graphdef", "experts"), donate_argnames=("state",),
                             compiler_options=options)
        self._decode_loop = jax.jit(_decode_loop, static_argnames=("graphdef", "experts", "chunk", "stats_shape"),
                                    donate_argnames=("state",), compiler_options=options)
        self._empty = jax.jit(_empty_state, static_argnames=("graphdef", "num_slots", "cache_len"))

    def _place(self, array):
        return jnp.asarray(array) if self.batch_sharding is None else jax.device_put(array, self.batch_sharding)

    cache_shape = staticmethod(cache_shape)
    longest = staticmethod(longest)

    def check_state(self, state) -> None:
        if not isinstance(state, DecodeState):
            raise RequestError(f"state must be the DecodeState prefill or decode_step returned, got "
                               f"{type(state).__name__}")

    def run_prefill(self, tokens_BT, mask_BT, *, cache_len: int, all_logits: bool = False):
        return self._prefill(self.graphdef, self.params, self._place(tokens_BT), self._place(mask_BT),
                             experts=self.experts, cache_len=cache_len, all_logits=all_logits)

    def run_step(self, state: DecodeState, tokens_B):
        return self._step(self.graphdef, self.params, state, self._place(tokens_B), experts=self.experts)

    def run_loop(self, state: DecodeState, rows: SlotRows, num_steps: int, chunk: int):
        rows = jax.tree.map(self._place, rows)
        return self._decode_loop(self.graphdef, self.params, state, rows, jnp.int32(num_steps),
                                 experts=self.experts, chunk=chunk,
                                 stats_shape=(len(self.cfg.moe_layers), self.cfg.num_experts))

    def empty_state(self, num_slots: int, cache_len: int) -> DecodeState:
        state = self._empty(self.graphdef, self.params, num_slots=num_slots, cache_len=cache_len)
        return state if self.batch_sharding is None else jax.device_put(state, self.batch_sharding)

    def insert(self, state: DecodeState, new: DecodeState, src_rows, slots) -> DecodeState:
        return insert_rows(state, new, jnp.asarray(src_rows), jnp.asarray(slots))

    def release(self, state: DecodeState, slots) -> DecodeState:
        return release_rows(state, jnp.asarray(slots))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_rows(state: DecodeState, new: DecodeState, src_rows, slots) -> DecodeState:
    """Rows src_rows of a prefilled state (its cache T <= S entries long) into the given slots of a decode state:
    their cache entries land at [0, T), and their lengths, positions and activity come along."""
    T = new.kv_valid_BS.shape[1]
    cache = [{name: layer[name].at[slots, :T].set(new_layer[name][src_rows]) for name in layer}
             for layer, new_layer in zip(state.cache, new.cache)]
    kv_valid_BS = state.kv_valid_BS.at[slots].set(False).at[slots, :T].set(new.kv_valid_BS[src_rows])
    return DecodeState(cache=cache, kv_valid_BS=kv_valid_BS,
                       next_position_B=state.next_position_B.at[slots].set(new.next_position_B[src_rows]),
                       write_index_B=state.write_index_B.at[slots].set(new.write_index_B[src_rows]),
                       active_B=state.active_B.at[slots].set(new.active_B[src_rows]))


@functools.partial(jax.jit, donate_argnames=("state",))
def release_rows(state: DecodeState, slots) -> DecodeState:
    """Frees slots: inactive (they route nothing) and empty."""
    return dataclasses.replace(state, kv_valid_BS=state.kv_valid_BS.at[slots].set(False),
                               write_index_B=state.write_index_B.at[slots].set(0),
                               active_B=state.active_B.at[slots].set(False))


class Engine(Generator):
    """A model ready to serve: the generator (request checks, buckets, sampling, EOS, slots) over the jitted
    executor.

    experts: how the routed experts run (default: all on this device, load-aware kernel selection).
    batch_sharding: optional sharding for [B, ...] inputs (e.g. data parallel over a mesh's "data" axis).
    buckets: the shape ladders generate rounds batches, prompt lengths and cache lengths up to (Generator).
    """

    def __init__(self, model: MoETransformer, *, experts: ExpertCompute = LocalExperts(),
                 batch_sharding: jax.sharding.Sharding | None = None, decode_chunk: int = DECODE_CHUNK,
                 buckets: ShapeBuckets | None = ShapeBuckets()):
        super().__init__(JitExecutor(model, experts=experts, batch_sharding=batch_sharding), buckets=buckets,
                         decode_chunk=decode_chunk)

    @property
    def graphdef(self):
        return self.executor.graphdef

    @property
    def params(self):
        return self.executor.params

    @property
    def experts(self) -> ExpertCompute:
        return self.executor.experts

    @property
    def batch_sharding(self):
        return self.executor.batch_sharding


_PREFILL_STATIC = ("graphdef", "experts", "cache_len", "all_logits")


def compiler_options(experts: ExpertCompute) -> dict | None:
    """The XLA options an expert compute asks of the programs that run it (e.g. the GPU latency-hiding
    scheduler for expert parallelism), or None."""
    return getattr(experts, "compiler_options", None) or None


def lower_prefill(graphdef, params, tokens_BT, mask_BT, *, experts: ExpertCompute, cache_len: int,
                  all_logits: bool = False):
    """The Engine's prefill program lowered for (possibly abstract) inputs: ShapeDtypeStructs with shardings
    over compile-only devices build it for a GPU without one (epsjax.aot)."""
    return jax.jit(_prefill, static_argnames=_PREFILL_STATIC, compiler_options=compiler_options(experts)).lower(
        graphdef, params, tokens_BT, mask_BT, experts=experts, cache_len=cache_len, all_logits=all_logits)


def prefill_inputs(mask_BT, cache_len: int):
    """Of a left-padded prompt batch: rotary positions counting real tokens only, the cache's valid slots
    [B, cache_len] and the active rows (a real prompt; batch padding has none). Shared with epsjax.offload."""
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
    kv_valid_BS = jnp.zeros((mask_BT.shape[0], cache_len), bool).at[:, :mask_BT.shape[1]].set(mask_BT)
    return positions_BT, kv_valid_BS, mask_BT.any(axis=1)


def decode_inputs(state: DecodeState):
    """Of one decode step: the cache's valid slots with each live row's new slot, and its attention mask
    [B, 1, S]. Shared with epsjax.offload and epsjax.dep."""
    B = state.kv_valid_BS.shape[0]
    kv_valid_BS = state.kv_valid_BS.at[jnp.arange(B), state.write_index_B].set(state.active_B, mode="drop")
    return kv_valid_BS, decode_mask(kv_valid_BS, state.write_index_B, 1)


def next_decode_state(state: DecodeState, cache, kv_valid_BS) -> DecodeState:
    """The state after a decode step wrote its tokens: live rows one token longer."""
    step_B = state.active_B.astype(jnp.int32)
    return DecodeState(cache=cache, kv_valid_BS=kv_valid_BS, next_position_B=state.next_position_B + step_B,
                       write_index_B=state.write_index_B + step_B, active_B=state.active_B)


def _prefill(graphdef, params, tokens_BT, mask_BT, *, experts, cache_len: int, all_logits: bool):
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions_BT, kv_valid_BS, active_B = prefill_inputs(mask_BT, cache_len)
    out = model(tokens_BT, positions_BT, mask_BT, prefill_mask(mask_BT), experts=experts,
                cache=model.init_cache(B, cache_len), write_index=0, last_logits_only=not all_logits, causal=True)
    state = DecodeState(cache=out.cache, kv_valid_BS=kv_valid_BS, next_position_B=positions_BT[:, -1] + 1,
                        write_index_B=jnp.full((B,), T, jnp.int32), active_B=active_B)
    logits = out.logits if all_logits else out.logits[:, -1]
    return logits, state, out.moe_stats


def _decode_loop(graphdef, params, state: DecodeState, rows: SlotRows, num_steps, *, experts, chunk: int,
                 stats_shape: tuple[int, int]):
    """Up to `num_steps` (traced, <= chunk) decode steps in one device call, stopping early once every slot has
    finished; each step feeds the slots' last tokens and samples the next as epsjax.generation.advance does, so
    the tokens equal a host loop of decode_step and advance. Returns the tokens and whether each slot emitted
    them [B, chunk] (columns past the count are zeros), the number of steps run, the state, the rows and MoE
    statistics summed over the steps (stats_shape: MoE layers, experts)."""
    B = rows.last_B.shape[0]
    n_moe, E = stats_shape

    def cond(carry):
        i, _, rows, *_ = carry
        return (i < num_steps) & ~jnp.all(rows.finished_B)

    def body(carry):
        i, state, rows, out_BC, emitted_BC, per_expert, dropped = carry
        logits_BV, state, stats = _decode_step(graphdef, params, state, rows.last_B, experts=experts)
        tokens_B, emitted_B, rows = advance(logits_BV, rows)
        out_BC = jax.lax.dynamic_update_slice_in_dim(out_BC, tokens_B[:, None], i, axis=1)
        emitted_BC = jax.lax.dynamic_update_slice_in_dim(emitted_BC, emitted_B[:, None], i, axis=1)
        return (i + 1, state, rows, out_BC, emitted_BC, per_expert + stats.tokens_per_expert,
                dropped + stats.dropped)

    init = (jnp.int32(0), state, rows, jnp.zeros((B, chunk), jnp.int32), jnp.zeros((B, chunk), bool),
            jnp.zeros((n_moe, E), jnp.int32), jnp.zeros((n_moe,), jnp.int32))
    count, state, rows, out_BC, emitted_BC, per_expert, dropped = jax.lax.while_loop(cond, body, init)
    return out_BC, emitted_BC, count, state, rows, MoEStats(tokens_per_expert=per_expert, dropped=dropped)


def _empty_state(graphdef, params, *, num_slots: int, cache_len: int) -> DecodeState:
    """num_slots free slots of cache_len entries."""
    model = nnx.merge(graphdef, params)
    return DecodeState(cache=model.init_cache(num_slots, cache_len),
                       kv_valid_BS=jnp.zeros((num_slots, cache_len), bool),
                       next_position_B=jnp.zeros((num_slots,), jnp.int32),
                       write_index_B=jnp.zeros((num_slots,), jnp.int32), active_B=jnp.zeros((num_slots,), bool))


def _batch_multiple(sharding) -> int:
    """How many shards a batch_sharding splits the batch dimension into (batches must be multiples of it)."""
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _decode_step(graphdef, params, state: DecodeState, tokens_B, *, experts):
    model = nnx.merge(graphdef, params)
    kv_valid_BS, mask_B1S = decode_inputs(state)
    valid_B1 = state.active_B[:, None]  # batch padding routes nothing
    out = model(tokens_B[:, None], state.next_position_B[:, None], valid_B1, mask_B1S, experts=experts,
                cache=state.cache, write_index=state.write_index_B, attend_to_cache=True)
    return out.logits[:, -1], next_decode_state(state, out.cache, kv_valid_BS), out.moe_stats
