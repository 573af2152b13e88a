"""Offloaded inference (ExpertFlow): the routed experts live in a host `ExpertStore`, a budgeted device pool caches
some of them, and the decoder layers run one at a time so that the cache engine sees every router's choice before
that layer's experts run.

Modes, all in this one runtime (same jitted layer pieces, same kernel):

    device       every expert in the device pool: the upper bound, no transfers
    on_demand    no cache: a layer loads the experts its router chose and frees them afterwards
    lru          an LRU (or LFU) cache filled on demand, no prediction (as mixtral-offloading does)
    expertflow   the routing-path predictor forecasts every layer's experts before the first MoE layer; PLEC
                 placement, prefetch in layer order, predictor-aware eviction, misses through a priority queue

One MoE layer, with the host in the loop:

    attention + router + sort by expert     (jit)     -> ids [T, K] read back to the host
    cache.demand(layer, chosen experts)                 -> waves of slot tables [E] once their experts are resident
    grouped expert FFN per wave             (jit)       pallas_kernels.expert_ffn(..., slot_of_expert=slot_E)
    combine + shared experts + residual     (jit)

Outputs equal the all-on-device run's in every mode, bitwise: a layer's FFN only runs rows whose expert is resident,
each row in exactly one wave (rows of other waves are exact zeros), with the same row-tiled grouped kernel (see
`OffloadEngine._backend`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from epsjax import pallas_kernels
from epsjax.compilation import ShapeBuckets
from epsjax.engine import (DecodeState, cache_shape, decode_inputs, insert_rows, longest, next_decode_state,
                           prefill_inputs, release_rows)
from epsjax.generation import GenerateResult, Generator, RequestError, SamplingParams
from epsjax.offload.cache import ExpertCacheEngine
from epsjax.offload.errors import OffloadError
from epsjax.offload.policies import make_policy
from epsjax.offload.state import OffloadState
from epsjax.offload.store import ExpertStore, device_memory_kind
from epsjax.offload.transfers import DeviceTransfers
from epsjax.models.quantize import is_quantized
from epsjax.models import MoEStats, MoETransformer
from epsjax.models.attention import AttentionContext
from epsjax.models.transformer import prefill_mask
from epsjax.sharding.expert_compute import combine, sort_by_expert

MODES = ("device", "on_demand", "lru", "expertflow")
_EXPERT_PARAMS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
_SLOT_DEPENDENT = ("dense", "ragged_dot")  # kernels whose per-row numerics depend on the number of slots


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """How the routed experts are offloaded.

    budget_bytes / budget_fraction: device bytes for routed experts (the pool plus staging buffers), absolute or as
        a fraction of all routed-expert bytes; ignored by mode "device".
    policy: eviction policy, "lru", "lfu" or "predictor" (default: "predictor" for expertflow, else "lru").
    max_inflight: transfers in flight at once (each needs a staging buffer inside the budget).
    backend: the grouped-FFN kernel ("auto": the selector's choice for the model's expert count).
    memory_kind: host memory for the store ("auto": pinned_host where the device has it).
    split_hits: run the resident experts of a layer while its misses transfer.
    """

    mode: Literal["device", "on_demand", "lru", "expertflow"] = "expertflow"
    budget_bytes: int | None = None
    budget_fraction: float | None = None
    policy: str | None = None
    max_inflight: int = 2
    backend: str = "auto"
    memory_kind: str = "auto"
    split_hits: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise OffloadError(f"unknown offload mode {self.mode!r}; expected one of {MODES}")
        if self.mode != "device" and (self.budget_bytes is None) == (self.budget_fraction is None):
            raise OffloadError(f"mode {self.mode!r} needs exactly one of budget_bytes and budget_fraction")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise OffloadError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")

    def budget(self, total_expert_bytes: int) -> int:
        if self.mode == "device":
            return total_expert_bytes
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        return int(self.budget_fraction * total_expert_bytes)


class _Head(nnx.Module):
    """The model's embedding, final norm and LM head without its layers (same method as MoETransformer)."""

    def __init__(self, embed, final_norm, lm_head_DV):
        self.embed, self.final_norm, self.lm_head_DV = embed, final_norm, lm_head_DV

    logits = MoETransformer.logits


def split_experts(model: MoETransformer):
    """(graphdef, state) of the model with every routed expert weight replaced by an empty placeholder, and the
    expert weights as numpy, per MoE layer (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D])."""
    graphdef, state = nnx.split(model)
    weights = {}

    def strip(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if "moe" in names and any(n in _EXPERT_PARAMS for n in names):
            layer = names[names.index("layers") + 1]
            name = next(n for n in names if n in _EXPERT_PARAMS)
            weights.setdefault(layer, {})[name] = np.array(leaf, copy=True)  # owned: no view of the device buffer
            return jnp.zeros((0,), leaf.dtype)
        return leaf

    state = jax.tree_util.tree_map_with_path(strip, state)
    per_layer = [tuple(weights[layer][n] for n in _EXPERT_PARAMS) for layer in sorted(weights)]
    return graphdef, state, per_layer


# Jitted pieces -----------------------------------------------------------------------------------------------------


# Programs the engine compiles per shape bucket (Engine's ShapeBuckets): the inputs' glue, embedding, attention and
# routing, the expert waves (first and accumulating), finishing, logits and the last-position slice.
OFFLOAD_PROGRAMS_PER_SHAPE = 8


@functools.partial(jax.jit, static_argnames=("cache_spec", "dtype", "cache_len"))
def _prefill_inputs(mask_BT, *, cache_spec, dtype, cache_len: int):
    """The Engine's prefill inputs (positions, valid cache slots, active rows), the attention mask and an empty
    cache (cache_spec: per layer, (name, shape) pairs) as one program."""
    positions_BT, kv_valid_BS, active_B = prefill_inputs(mask_BT, cache_len)
    cache = [{name: jnp.zeros(shape, dtype) for name, shape in layer} for layer in cache_spec]
    return positions_BT, prefill_mask(mask_BT), cache, kv_valid_BS, active_B


@jax.jit
def _decode_inputs(state: DecodeState):
    """The Engine's decode inputs (valid cache slots, attention mask), positions and valid rows as one program."""
    return *decode_inputs(state), state.next_position_B[:, None], state.active_B[:, None]


@functools.partial(jax.jit, static_argnames=("cache_spec", "dtype", "num_slots", "cache_len"))
def _empty_decode_state(*, cache_spec, dtype, num_slots: int, cache_len: int) -> DecodeState:
    """num_slots free slots of cache_len entries (cache_spec: per layer, (name, shape) pairs)."""
    return DecodeState(cache=[{name: jnp.zeros(shape, dtype) for name, shape in layer} for layer in cache_spec],
                       kv_valid_BS=jnp.zeros((num_slots, cache_len), bool),
                       next_position_B=jnp.zeros((num_slots,), jnp.int32),
                       write_index_B=jnp.zeros((num_slots,), jnp.int32), active_B=jnp.zeros((num_slots,), bool))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens_BT):
    return nnx.merge(graphdef, state).embed(tokens_BT)


@functools.partial(jax.jit, static_argnames=("graphdef", "last_logits_only"))
def _logits(graphdef, state, x_BTD, *, last_logits_only: bool):
    return nnx.merge(graphdef, state).logits(x_BTD, last_logits_only=last_logits_only)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache_layer",))
def _dense_layer(graphdef, state, x_BTD, valid_BT, ctx, cache_layer):
    x_BTD, cache_layer, _ = nnx.merge(graphdef, state)(x_BTD, valid_BT, ctx, cache_layer, None)
    return x_BTD, cache_layer


@functools.partial(jax.jit, static_argnames=("graphdef", "num_experts"), donate_argnames=("cache_layer",))
def _attend_route(graphdef, state, x_BTD, valid_BT, ctx, cache_layer, *, num_experts: int):
    """Attention, the MoE's input, its router, and the (token, k) assignments sorted by expert (as LocalExperts)."""
    layer = nnx.merge(graphdef, state)
    B, T, D = x_BTD.shape
    h_BTD, moe_in_BTD, ids_TK, weights_TK, cache_layer = layer.attend_route(x_BTD, ctx, cache_layer)
    order, _, group_sizes_E = sort_by_expert(ids_TK, valid_BT.reshape(B * T), num_experts)
    x_sorted_MD = moe_in_BTD.reshape(B * T, D)[order // ids_TK.shape[1]]
    return h_BTD, moe_in_BTD, cache_layer, ids_TK, weights_TK, order, group_sizes_E, x_sorted_MD


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "accumulate"))
def _experts(x_sorted_MD, group_sizes_E, pool_g_SDF, pool_u_SDF, pool_d_SFD, slot_E, y_acc_MD, *, backend: str,
             tiling, accumulate: bool):
    """One wave: rows of the experts in slot_E (-1: not in this wave -> zero rows), added to the earlier waves'."""
    y_MD = pallas_kernels.expert_ffn(x_sorted_MD, pool_g_SDF, pool_u_SDF, pool_d_SFD, group_sizes_E,
                                     slot_of_expert=slot_E, backend=backend, tiling=tiling)
    return y_acc_MD + y_MD if accumulate else y_MD


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _finish(graphdef, state, h_BTD, moe_in_BTD, y_sorted_MD, order, weights_TK):
    """Un-sort and weight the expert rows (as LocalExperts), then the layer's last stage (shared experts,
    residuals: DecoderLayer.finish)."""
    layer = nnx.merge(graphdef, state)
    B, T, D = h_BTD.shape
    y_TD = combine(y_sorted_MD, order, weights_TK).astype(moe_in_BTD.dtype)
    return layer.finish(h_BTD, moe_in_BTD, y_TD.reshape(B, T, D))


# The runtime -------------------------------------------------------------------------------------------------------


class OffloadEngine(Generator):
    """An Engine (same prefill / decode_step / generate / slots contract) whose routed experts are offloaded: the
    generator over itself as the executor (run_prefill, run_step a layer at a time from the host, insert,
    release; no on-device loop).

    predictor: a `epsjax.offload.predictor.RoutingPredictor` (required by mode "expertflow").
    record_routing: keep every MoE layer's routing (ids [B*T, K] per layer) of each forward in `routing_log`.

    The model's non-expert parameters are placed on `device`; its routed experts go to the host store (create the
    model on the host, e.g. under jax.default_device(cpu), when its experts do not fit on the device; or read a
    checkpoint with epsjax.checkpoint.load_host_experts and build the engine with `from_split`: the routed experts
    then go from the files to the host store and never to the device).
    """

    batch_multiple = 1

    def __init__(self, model: MoETransformer, config: OffloadConfig = OffloadConfig(mode="device"), *,
                 predictor=None, device: jax.Device | None = None, record_routing: bool = False,
                 buckets: ShapeBuckets | None = ShapeBuckets()):
        if is_quantized(model):
            raise OffloadError(f"{model.cfg.name}: offloading takes float experts; quantized (FP8) experts run on one "
                             "device without offloading for now")
        self._build(model.cfg, *split_experts(model), config, predictor=predictor, device=device,
                    record_routing=record_routing, buckets=buckets)

    @classmethod
    def from_split(cls, cfg, graphdef, state, expert_weights, config: OffloadConfig = OffloadConfig(mode="device"),
                   *, predictor=None, device: jax.Device | None = None, record_routing: bool = False,
                   buckets: ShapeBuckets | None = ShapeBuckets()) -> "OffloadEngine":
        """The engine of a model already split into its routed experts and the rest, as `split_experts` returns it
        (graphdef, state with [0] placeholders for the routed experts, expert_weights: per MoE layer (w_gate
        [E, D, F], w_up [E, D, F], w_down [E, F, D]) host arrays), e.g. read straight from a checkpoint by
        epsjax.checkpoint.load_host_experts, so the experts never go to the device whole."""
        engine = cls.__new__(cls)
        engine._build(cfg, graphdef, state, expert_weights, config, predictor=predictor, device=device,
                      record_routing=record_routing, buckets=buckets)
        return engine

    def _build(self, cfg, graphdef, state, weights, config: OffloadConfig, *, predictor, device, record_routing,
               buckets):
        self.cfg = cfg
        self.config = config
        self.device = device or jax.devices()[0]
        if config.mode == "expertflow" and predictor is None:
            raise OffloadError("mode 'expertflow' needs a routing predictor")
        if predictor is not None:
            pc = predictor.config
            if (pc.num_layers, pc.num_experts, pc.top_k) != (len(cfg.moe_layers), cfg.num_experts, cfg.router.top_k) \
                    or pc.vocab_size < cfg.vocab_size:
                raise OffloadError(f"the predictor ({pc.num_layers} MoE layers, {pc.num_experts} experts, top-"
                                 f"{pc.top_k}, vocab {pc.vocab_size}) does not fit the model ({len(cfg.moe_layers)}, "
                                 f"{cfg.num_experts}, top-{cfg.router.top_k}, vocab {cfg.vocab_size})")
        self.predictor = predictor
        self.store = ExpertStore(weights, device=self.device, memory_kind=config.memory_kind)
        del weights
        on_device = SingleDeviceSharding(self.device, memory_kind=device_memory_kind(self.device))
        self._shell = nnx.merge(graphdef, jax.device_put(state, on_device))
        self._head = nnx.split(_Head(self._shell.embed, self._shell.final_norm, self._shell.lm_head_DV))
        self._layers = []  # (graphdef, state, MoE layer index or None) per decoder layer
        moe_index = 0
        for layer in self._shell.layers:
            self._layers.append((*nnx.split(layer), moe_index if layer.moe is not None else None))
            moe_index += layer.moe is not None
        self.num_moe_layers = moe_index
        self.cache = self._make_cache()
        self.record_routing = record_routing
        self.routing_log: list[np.ndarray] = []
        self._backends: dict[int, tuple] = {}
        self.schedule_log: dict | None = None
        super().__init__(self, buckets=buckets)  # the generator drives this engine's own executor methods

    def _make_cache(self) -> ExpertCacheEngine:
        c, store = self.config, self.store
        L, E, bpe = store.num_layers, store.num_experts, store.bytes_per_expert
        budget = c.budget(store.total_bytes)
        if c.mode == "device":
            transfers = DeviceTransfers(store, L * E, initial=[np.concatenate(w) for w in zip(
                *(store.stacked(layer) for layer in range(L)))])
            cache = ExpertCacheEngine(num_layers=L, num_experts=E, num_slots=L * E, transfers=transfers,
                                      policy=make_policy("lru"), bytes_per_expert=bpe, budget_bytes=budget,
                                      prefetch=False)
            for layer in range(L):
                for e in range(E):
                    cache.mark_resident((layer, e), layer * E + e)
            return cache
        num_slots = min(store.slots_for(budget) - c.max_inflight, L * E)
        if num_slots < 1:
            raise OffloadError(f"an expert budget of {budget} bytes holds {store.slots_for(budget)} experts of "
                             f"{bpe} bytes; it needs at least max_inflight + 1 = {c.max_inflight + 1}")
        policy = c.policy or ("predictor" if c.mode == "expertflow" else "lru")
        return ExpertCacheEngine(
            num_layers=L, num_experts=E, num_slots=num_slots, transfers=DeviceTransfers(store, num_slots),
            policy=make_policy(policy), bytes_per_expert=bpe, budget_bytes=budget, max_inflight=c.max_inflight,
            prefetch=c.mode == "expertflow", keep=c.mode != "on_demand", split_hits=c.split_hits)

    @property
    def stats(self):
        return self.cache.stats

    @property
    def non_expert_bytes(self) -> int:
        """Device bytes of the parameters that stay on the device (all but the routed experts)."""
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(nnx.state(self._shell)))

    # Executor contract (epsjax.generation) ---------------------------------------------------------------------

    cache_shape = staticmethod(lambda state: cache_shape(state.decode))
    longest = staticmethod(lambda state: longest(state.decode))

    def check_state(self, state) -> None:
        if not isinstance(state, OffloadState):
            raise RequestError(f"state must be the OffloadState prefill or decode_step returned, got "
                               f"{type(state).__name__}")

    def _cache_spec(self, rows: int, cache_len: int):
        return tuple(tuple(sorted(layer.attn.cache_shapes(rows, cache_len).items())) for layer in self._shell.layers)

    def run_prefill(self, tokens_BT, mask_BT, *, cache_len: int, all_logits: bool = False):
        B, T = tokens_BT.shape
        pred = self._predict(tokens_BT, mask_BT, last_only=False)
        # one program per (batch, prompt, cache) bucket for the glue, not one per eager op
        mask_dev = jnp.asarray(mask_BT)
        positions_BT, mask_BTS, empty_cache, kv_valid_BS, active_B = _prefill_inputs(
            mask_dev, cache_spec=self._cache_spec(B, cache_len), dtype=self.cfg.jnp_dtype, cache_len=cache_len)
        logits, cache, stats = self._forward(
            jnp.asarray(tokens_BT, jnp.int32), positions_BT, mask_dev, mask_BTS, empty_cache, write_index=0,
            attend_to_cache=False, last_logits_only=not all_logits, pred_LE=pred, valid_host=mask_BT)
        decode = DecodeState(cache=cache, kv_valid_BS=kv_valid_BS, next_position_B=positions_BT[:, -1] + 1,
                             write_index_B=jnp.full((B,), T, jnp.int32), active_B=active_B)
        W = self._window
        recent = np.zeros((B, W), np.int32)
        recent_valid = np.zeros((B, W), bool)
        take = min(W, T)
        recent[:, W - take:], recent_valid[:, W - take:] = tokens_BT[:, T - take:], mask_BT[:, T - take:]
        state = OffloadState(decode=decode, recent_BW=recent, recent_valid_BW=recent_valid)
        return (logits if all_logits else logits[:, -1]), state, stats

    def run_step(self, state: OffloadState, tokens_B):
        d = state.decode
        tokens_B = np.asarray(tokens_B, np.int32)
        active_B1 = np.asarray(d.active_B)[:, None]  # batch padding and free slots route nothing
        recent = np.concatenate([state.recent_BW[:, 1:], tokens_B[:, None]], axis=1)
        recent_valid = np.concatenate([state.recent_valid_BW[:, 1:], active_B1], axis=1)
        pred = self._predict(recent, recent_valid, last_only=True)
        kv_valid_BS, mask_BTS, positions_B1, valid_B1 = _decode_inputs(d)
        logits, cache, stats = self._forward(
            jnp.asarray(tokens_B)[:, None], positions_B1, valid_B1, mask_BTS, d.cache, write_index=d.write_index_B,
            attend_to_cache=True, last_logits_only=False, pred_LE=pred, valid_host=active_B1)
        decode = next_decode_state(d, cache, kv_valid_BS)
        return logits[:, -1], OffloadState(decode=decode, recent_BW=recent, recent_valid_BW=recent_valid), stats

    def empty_state(self, num_slots: int, cache_len: int) -> OffloadState:
        decode = _empty_decode_state(cache_spec=self._cache_spec(num_slots, cache_len), dtype=self.cfg.jnp_dtype,
                                     num_slots=num_slots, cache_len=cache_len)
        W = self._window
        return OffloadState(decode=decode, recent_BW=np.zeros((num_slots, W), np.int32),
                            recent_valid_BW=np.zeros((num_slots, W), bool))

    def insert(self, state: OffloadState, new: OffloadState, src_rows, slots) -> OffloadState:
        recent, recent_valid = state.recent_BW.copy(), state.recent_valid_BW.copy()
        recent[slots], recent_valid[slots] = new.recent_BW[src_rows], new.recent_valid_BW[src_rows]
        return OffloadState(decode=insert_rows(state.decode, new.decode, jnp.asarray(src_rows), jnp.asarray(slots)),
                            recent_BW=recent, recent_valid_BW=recent_valid)

    def release(self, state: OffloadState, slots) -> OffloadState:
        recent_valid = state.recent_valid_BW.copy()
        recent_valid[slots] = False
        return OffloadState(decode=release_rows(state.decode, jnp.asarray(slots)), recent_BW=state.recent_BW,
                            recent_valid_BW=recent_valid)

    def generate(self, prompts, *, max_new_tokens: int = 16, sampling: SamplingParams = SamplingParams(),
                 stop_at_eos: bool = True, schedule_tokens: bool = False) -> GenerateResult:
        """The Engine's generate; with `schedule_tokens`, ExpertFlow's token scheduler: the prompts decode as two
        batches that alternate steps, and before every step their sequences are re-split by predicted routing
        path so each batch activates fewer experts (scheduler.generate_two_batches; KV caches move with their
        sequences). Every request samples from its own stream (epsjax.generation), so the tokens equal the
        unscheduled run's, greedy or sampled.
        After a scheduled call, `schedule_log` holds the distinct experts per batch-step and the split times."""
        if not schedule_tokens:
            return super().generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                    stop_at_eos=stop_at_eos)
        from epsjax.offload.scheduler import generate_two_batches  # the scheduler builds on this module

        ids, params, max_new = self.check_request(prompts, max_new_tokens, sampling)
        if self.predictor is None:
            raise RequestError("schedule_tokens regroups sequences by predicted routing path and needs the engine's "
                               "routing predictor (mode 'expertflow', or pass predictor=)")
        if len(ids) < 2:
            raise RequestError(f"schedule_tokens re-splits two batches and needs at least 2 prompts, got {len(ids)}")
        result, self.schedule_log = generate_two_batches(
            self, ids, max_new_tokens=max_new, sampling=params,
            eos=self.cfg.eos_token_id if stop_at_eos else None, regroup=True)
        return result

    # Internals ----------------------------------------------------------------------------------------------------

    @property
    def _window(self) -> int:
        return self.predictor.config.window if self.predictor is not None else 1

    def _predict(self, tokens_BT, valid_BT, *, last_only: bool):
        """The forecast [L, E] for the coming forward (scores > 0 = predicted), or None without a predictor."""
        if self.config.mode != "expertflow":
            return None
        return self.predictor.expert_scores(tokens_BT, valid_BT, last_only=last_only)

    def _backend(self, m: int) -> tuple[str, object]:
        """The kernel for M sorted rows. "auto" asks the selector for the model's E experts (not the pool's S slots)
        among the row-tiled grouped kernels (chunked on CPU, Pallas on GPU): they multiply each row tile by one
        slot's matrices, so a row's result depends on neither the pool size nor the other groups, which is what
        makes every mode's output bitwise equal. DenseGemm (batched over slots) and ragged_dot (XLA:CPU lowers it
        to a masked product over all slots) are left out for that reason."""
        if m not in self._backends:
            store, backend = self.store, self.config.backend
            if backend == "auto":
                choice = pallas_kernels.select_backend(
                    tokens_per_expert=m / store.num_experts, num_experts=store.num_experts, k=store.d_model,
                    n=store.ffn_dim, dtype=store.dtype, op="expert_ffn", exclude=_SLOT_DEPENDENT)
                self._backends[m] = (choice.backend, choice.tiling)
            else:
                self._backends[m] = (backend, None)
        return self._backends[m]

    def _forward(self, tokens_BT, positions_BT, valid_BT, mask_BTS, cache, *, write_index, attend_to_cache,
                 last_logits_only, pred_LE, valid_host):
        ctx = AttentionContext(positions_BT=positions_BT, mask_BTS=mask_BTS, write_index=write_index,
                               attend_to_cache=attend_to_cache)
        valid_T = np.asarray(valid_host).reshape(-1)
        head_graphdef, head_state = self._head
        x_BTD = _embed(head_graphdef, head_state, tokens_BT)
        new_cache, tokens_per_expert, routing = list(cache), [], []
        engine = self.cache
        engine.begin_step(pred_LE)
        for i, (graphdef, state, moe_layer) in enumerate(self._layers):
            if moe_layer is None:
                x_BTD, new_cache[i] = _dense_layer(graphdef, state, x_BTD, valid_BT, ctx, new_cache[i])
                continue
            h_BTD, moe_in_BTD, new_cache[i], ids_TK, weights_TK, order, group_sizes_E, x_sorted_MD = _attend_route(
                graphdef, state, x_BTD, valid_BT, ctx, new_cache[i], num_experts=self.store.num_experts)
            engine.wait_until(ids_TK.is_ready)  # keeps transfers moving while the router runs
            ids_host = np.asarray(ids_TK)
            if self.record_routing:
                routing.append(np.where(valid_T[:, None], ids_host, -1))
            backend, tiling = self._backend(x_sorted_MD.shape[0])
            y_MD = None
            for slot_E in engine.demand(moe_layer, np.unique(ids_host[valid_T])):
                pool = engine.transfers.pool
                y_MD = _experts(x_sorted_MD, group_sizes_E, *pool, jnp.asarray(slot_E),
                                x_sorted_MD if y_MD is None else y_MD, backend=backend, tiling=tiling,
                                accumulate=y_MD is not None)
                engine.transfers.fence = y_MD
            if y_MD is None:  # no valid token
                y_MD = jnp.zeros_like(x_sorted_MD)
            x_BTD = _finish(graphdef, state, h_BTD, moe_in_BTD, y_MD, order, weights_TK)
            engine.end_layer(moe_layer)
            tokens_per_expert.append(group_sizes_E)
        engine.end_step()
        if self.record_routing:
            self.routing_log.append(np.stack(routing))
        logits = _logits(head_graphdef, head_state, x_BTD, last_logits_only=last_logits_only)
        stats = MoEStats(tokens_per_expert=jnp.stack(tokens_per_expert),
                         dropped=jnp.zeros((len(tokens_per_expert),), jnp.int32))
        return logits, new_cache, stats


def expert_bytes(cfg) -> int:
    """All routed-expert bytes of a model config."""
    return len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.d_model * cfg.expert_ffn_dim * cfg.jnp_dtype.itemsize

