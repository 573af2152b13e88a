"""The DEP runtime: a model split over an attention group and an expert group, run by a schedule.

    groups = DEPGroups.split(attention=3, experts=5, num_experts=cfg.num_experts)
    runtime = DEPRuntime(model, groups)
    out = runtime.prefill(tokens, mask, schedule=DEPSchedule.findep(micro_batches=2, segments=2, order="AASS"))
    out.logits        # [B, T, V], the single-device model's logits
    out.transfers     # every A2E / E2A piece: rows and bytes
    result = runtime.generate(prompts, max_new_tokens=16, schedule=schedule)  # Engine.generate's contract (decode.py)

Placement: the embedding, attention, routers, shared experts, dense layers and LM head are replicated over the
attention mesh (attention is data parallel: a micro-batch's sequences are split over its devices); the routed
experts of every MoE layer are stacked into expert slots and split over the expert mesh (groups.py), each expert
device receiving its own slots only; `from_checkpoint` reads a checkpoint straight into that layout (placement.py).

Decoding: a prefill with a KV cache and each decode step run the same schedule over the same micro-batches; every
micro-batch keeps its cache on the attention group, split like its sequences. A decode state is a set of slots
(r1 micro-batches of ag * ma rows, slot i in micro-batch i // (ag * ma)), each row with its own cache length, write
and rotary positions: prefilled requests are inserted into free slots and finished ones released (decode.py).

Execution: the host walks the schedule's task list (DEPSchedule.tasks) in issue order and dispatches each task
asynchronously: jitted programs on one group's mesh, and explicit jax.device_put transfers of exactly the routed
rows between the groups (transfer.py). Nothing waits for a task to finish except the A2E of a micro-batch, which
must read its [ag, eg, r2, slots] routing counts on the host to size the transfers; by then the tasks issued
before it (other micro-batches' expert FFNs, transfers, shared experts) are queued on their devices and keep
running, which is what lets the two groups work at the same time. serialize=True blocks after every task
instead (the no-overlap reference for measuring that concurrency).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from epsjax.compilation import ShapeBuckets
from epsjax.dep import steps, transfer
from epsjax.dep.decode import DEPEngine, DEPState
from epsjax.dep.groups import DEPGroups
from epsjax.dep.schedule import DEPSchedule, TaskRef, layer_kinds
from epsjax.scheduler.errors import ScheduleError
from epsjax.engine import (DecodeState, GenerateResult, RequestError, SamplingParams, decode_inputs, insert_rows,
                           next_decode_state, prefill_inputs, release_rows)
from epsjax.models import MoETransformer
from epsjax.models.quantize import EXPERT_WEIGHTS, is_quantized
from epsjax.models.transformer import prefill_mask
from epsjax.sharding import DATA, EXPERT

_EXPERT_FILTER = nnx.Any(*(nnx.PathContains(name) for name in EXPERT_WEIGHTS))


@dataclasses.dataclass
class DEPOutput:
    logits: jax.Array                    # [B, T, V] float32, on the attention group
    tokens_per_expert: np.ndarray        # [MoE layers, E] routed (token, k) assignments (from the A2E counts)
    transfers: transfer.TransferLog      # every piece moved between the groups
    seconds: float                       # wall time from the first dispatch to the logits being ready
    issue_times: list[tuple[str, float]]  # (task, seconds after start when the host dispatched it)


@dataclasses.dataclass
class _MicroBatch:
    tokens: jax.Array                     # [ag * ma, T] split over the attention group, as every array below
    positions: jax.Array                  # [ag * ma, T] rotary positions
    valid: jax.Array                      # [ag * ma, T] tokens that route (False: padding)
    mask: jax.Array                       # [ag * ma, T, S] attention mask (engine.prefill_inputs / decode_inputs)
    write_index: jax.Array                # [ag * ma] each row's cache slot of its first new token
    cache: list | None = None             # per layer, the KV cache [ag * ma, S, ...]; None: prefill without one
    decode: bool = False                  # a decode step (one new token attends to the cache)
    last_only: bool = False               # the head computes the last position's logits only
    x: jax.Array | None = None
    h: jax.Array | None = None
    moe_in: jax.Array | None = None
    weights: jax.Array | None = None
    x_sorted: jax.Array | None = None
    order: jax.Array | None = None
    counts_device: jax.Array | None = None
    counts: np.ndarray | None = None
    pieces: dict | None = None            # A2E pieces by segment, [a][e], until the segment's expert FFN
    returned: list | None = None          # E2A pieces (attention device, row, [n, D]) not yet in place
    shared: jax.Array | None = None
    expert_rows: dict = dataclasses.field(default_factory=dict)
    logits: jax.Array | None = None


@dataclasses.dataclass
class _Step:
    """What one run of a schedule produced."""

    logits: jax.Array                    # [rows, T, V] (T = 1 with last_only) over every micro-batch, in order
    tokens_per_expert: np.ndarray        # [MoE layers, E]
    transfers: transfer.TransferLog
    seconds: float
    issue_times: list[tuple[str, float]]


class _Dispatcher:
    """Dispatches a schedule's tasks as early as the host can without waiting, keeping the schedule's order on each
    device queue.

    A device runs what it is given in order (one queue per device, like one CUDA stream), so each group's tasks go
    out in the schedule's order: the attention group's (embed ... combine, and A2E, whose sends are slices of the
    attention output on the attention devices) and the expert group's (expert FFNs). E2A tasks, which only slice
    and send finished expert output, go out as soon as that output is ready, in their own order. A task also waits
    for the tasks it depends on to have been dispatched. The host itself waits only when nothing can go: for the
    first eligible task in issue order (an A2E reading its routing counts, an E2A its expert output; on the CPU
    client even slicing an unfinished array blocks the host, as small programs run inline).
    """

    QUEUE = {"a2e": "attention", "experts": "experts", "e2a": "e2a"}  # every other kind: "attention"

    def __init__(self, tasks, dispatch, waits_on):
        self.tasks, self.dispatch, self.waits_on = tasks, dispatch, waits_on

    def run(self) -> None:
        pending: list[TaskRef] = []
        names: set[str] = set()
        for task in self.tasks:
            pending.append(task)
            names.add(task.name)
            self._pump(pending, names, block=False)
        while pending:
            self._pump(pending, names, block=True)

    def _pump(self, pending, names, *, block: bool) -> None:
        """Dispatches every task that can go; with block=True, first the earliest eligible one, waiting if need be."""
        while True:
            stalled_queues, chosen = set(), None
            for i, task in enumerate(pending):
                queue = self.QUEUE.get(task.kind, "attention")
                if queue in stalled_queues or names.intersection(task.deps):
                    stalled_queues.add(queue)
                    continue
                if block or all(a.is_ready() for a in self.waits_on(task)):
                    chosen = i
                    break
                stalled_queues.add(queue)
            if chosen is None:
                return
            task = pending.pop(chosen)
            names.discard(task.name)
            self.dispatch(task)
            block = False


def _placeholders(state):
    """Zero-size stand-ins for parameters a group does not hold (the program never reads them)."""
    return jax.tree.map(lambda v: jnp.zeros((0,), v.dtype), state)


def _prefill_glue(valid_BT, *, cache_len: int):
    """The Engine's prefill inputs of one micro-batch (engine.prefill_inputs), its attention mask, the rows' write
    positions (0: the prompt fills [0, T)) and its DecodeState after the prefill (its cache still to be filled)."""
    B, T = valid_BT.shape
    positions_BT, kv_valid_BS, active_B = prefill_inputs(valid_BT, cache_len)
    state = DecodeState(cache=None, kv_valid_BS=kv_valid_BS, next_position_B=positions_BT[:, -1] + 1,
                        write_index_B=jnp.full((B,), T, jnp.int32), active_B=active_B)
    return positions_BT, prefill_mask(valid_BT), jnp.zeros((B,), jnp.int32), state


def _decode_glue(state: DecodeState):
    """Of one micro-batch's decode step (its state without the cache): the attention mask (engine.decode_inputs),
    positions, the tokens that route (live rows only: batch padding and free slots route nothing) and the state
    after the step (engine.next_decode_state: live rows one token longer; its cache still to be set)."""
    kv_valid_BS, mask_B1S = decode_inputs(state)
    return (mask_B1S, state.next_position_B[:, None], state.active_B[:, None],
            next_decode_state(state, None, kv_valid_BS))


def _empty_rows(rows: int, cache_len: int) -> DecodeState:
    """A micro-batch of free slots (its cache still to be set)."""
    return DecodeState(cache=None, kv_valid_BS=jnp.zeros((rows, cache_len), bool),
                       next_position_B=jnp.zeros((rows,), jnp.int32), write_index_B=jnp.zeros((rows,), jnp.int32),
                       active_B=jnp.zeros((rows,), bool))


class DEPRuntime:
    """A MoETransformer placed on DEPGroups; `prefill` runs it under a DEPSchedule, `generate` decodes.

    backend: the pallas_kernels backend of the expert group's grouped FFN ("auto": the selector's choice).
    buckets: prompt lengths (left-padded further) and micro-batch sizes are rounded up to its ladders, so the
        programs compiled are bounded as the Engine's (epsjax.compilation); None: exact shapes.
    """

    def __init__(self, model: MoETransformer, groups: DEPGroups, *, backend: str = "auto",
                 buckets: ShapeBuckets | None = ShapeBuckets()):
        cfg = model.cfg
        self.buckets = buckets  # prompt lengths and micro-batch sizes rounded up to its ladders (None: exact)
        if is_quantized(model):
            raise ScheduleError(f"{cfg.name}: the DEP runtime takes float experts; quantized (FP8) experts run on one "
                             "device for now")
        if groups.placement.num_experts != cfg.num_experts:
            raise ScheduleError(f"groups place {groups.placement.num_experts} experts, {cfg.name} has {cfg.num_experts}")
        self.cfg, self.groups = cfg, groups
        self._replicated = replicated = NamedSharding(groups.attention_mesh, P())
        self._batch = NamedSharding(groups.attention_mesh, P(DATA))
        self._slots = NamedSharding(groups.expert_mesh, P(EXPERT))
        self._expert_step = steps.ExpertStep(groups.expert_mesh, backend)
        self._mesh = groups.attention_mesh
        self._prefill_glue = jax.jit(_prefill_glue, static_argnames=("cache_len",), out_shardings=self._batch)
        self._decode_glue = jax.jit(_decode_glue, out_shardings=self._batch)
        self._empty_rows = jax.jit(_empty_rows, static_argnames=("rows", "cache_len"), out_shardings=self._batch)
        # one micro-batch's slot bookkeeping (engine.insert_rows / release_rows), kept split over the attention group
        self._insert_rows = jax.jit(insert_rows, out_shardings=self._batch, donate_argnums=(0,))
        self._release_rows = jax.jit(release_rows, out_shardings=self._batch, donate_argnums=(0,))

        graphdef, layers, top = nnx.split(model, nnx.PathContains("layers"), ...)
        self._top = (graphdef, _placeholders(layers), jax.device_put(top, replicated))
        self._layers = []
        for layer in model.layers:
            if layer.moe is None:
                g, state = nnx.split(layer)
                self._layers.append((g, jax.device_put(state, replicated), None))
                continue
            g, expert_state, rest = nnx.split(layer, _EXPERT_FILTER, ...)
            weights = tuple(self._place_experts(getattr(layer.moe, name)[...]) for name in EXPERT_WEIGHTS)
            self._layers.append((g, (_placeholders(expert_state), jax.device_put(rest, replicated)), weights))
        self._cache_spec = [layer.attn.cache_shapes(1, 1) for layer in model.layers]  # name -> (1, 1, ...)
        self._has_shared = any(layer.moe is not None and layer.moe.shared is not None for layer in model.layers)
        self._moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}

    @classmethod
    def from_checkpoint(cls, path, groups: DEPGroups, *, dtype: str | None = None, backend: str = "auto",
                        buckets: ShapeBuckets | None = ShapeBuckets(), progress: bool = False,
                        allow_nonfinite: bool = False) -> "DEPRuntime":
        """The runtime of a Hugging Face checkpoint directory, each parameter read once and placed straight onto
        its group (epsjax.dep.placement.load_placed): no device ever holds more than its share."""
        from epsjax.dep.placement import load_placed

        model = load_placed(path, groups, dtype=dtype, progress=progress, allow_nonfinite=allow_nonfinite)
        return cls(model, groups, backend=backend, buckets=buckets)

    def _place_experts(self, w_E__):
        """[E, ...] -> [eg * slots, ...] in slot order (empty slots zero), split over the expert mesh: each expert
        device receives its own experts' rows only. Weights already laid out so (load_placed) stay where they are."""
        placement, eg = self.groups.placement, self.groups.eg
        if (w_E__.shape[0] == placement.num_slots and isinstance(w_E__, jax.Array)
                and w_E__.sharding.is_equivalent_to(self._slots, w_E__.ndim)):
            return w_E__
        table = placement.expert_of_slot().reshape(eg, placement.slots)
        shards = []
        for e, device in enumerate(self.groups.expert_devices):
            experts = table[e][table[e] >= 0]   # its filled slots come first
            piece = jax.device_put(w_E__[experts], device)
            if len(experts) < placement.slots:  # empty slots: zeros, made on the expert device
                piece = jnp.concatenate([piece, jnp.zeros((placement.slots - len(experts),) + piece.shape[1:],
                                                          piece.dtype, device=device)])
            shards.append(piece)
        return jax.make_array_from_single_device_arrays((placement.num_slots,) + tuple(w_E__.shape[1:]),
                                                        self._slots, shards)

    # Running ----------------------------------------------------------------------------------------------------

    def prefill(self, tokens_BT, mask_BT=None, *, schedule: DEPSchedule = DEPSchedule.naive(),
                serialize: bool = False) -> DEPOutput:
        """All-position logits of a prompt batch (left-padded as Engine.pad_prompts does), run under `schedule`.

        The batch is cut into r1 micro-batches of ag * ma sequences (ma = ceil(B / (r1 * ag)); missing sequences
        are padding, never routed); each attention device's ma * T tokens into r2 contiguous segments.
        """
        tokens_BT = np.asarray(tokens_BT, np.int32)
        B, T = tokens_BT.shape
        mask_BT = np.ones((B, T), bool) if mask_BT is None else np.asarray(mask_BT, bool)
        T_run = T if self.buckets is None else self.buckets.length(T)
        if T_run > T:  # more left padding: one program per length bucket
            tokens_BT = np.concatenate([np.full((B, T_run - T), self.cfg.pad_token_id, np.int32), tokens_BT], 1)
            mask_BT = np.concatenate([np.zeros((B, T_run - T), bool), mask_BT], 1)
        micro, _ = self._prefill_micro_batches(tokens_BT, mask_BT, schedule.micro_batches, cache_len=None)
        step = self._execute(micro, schedule, serialize=serialize)
        logits = step.logits[:B, T_run - T:]
        logits.block_until_ready()
        return DEPOutput(logits, step.tokens_per_expert, step.transfers, step.seconds, step.issue_times)

    def engine(self, schedule: DEPSchedule = DEPSchedule.naive()) -> DEPEngine:
        """This runtime under the Engine's contract (prefill with a KV cache, decode_step, generate), every step
        run under `schedule`."""
        return DEPEngine(self, schedule)

    def generate(self, prompts, *, max_new_tokens: int = 16,
                 sampling: SamplingParams | list[SamplingParams] = SamplingParams(), stop_at_eos: bool = True,
                 schedule: DEPSchedule = DEPSchedule.naive()) -> GenerateResult:
        """Generator.generate's contract (greedy or sampled, one SamplingParams per prompt or one for all, EOS,
        left padding, the same tokens as the single-device Engine): the prefill and every decode step run as
        `schedule`, the KV cache on the attention group."""
        return self.engine(schedule).generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                              stop_at_eos=stop_at_eos)

    def prefill_with_cache(self, tokens_BT, mask_BT, *, cache_len: int, schedule: DEPSchedule):
        """Runs checked, left-padded prompts [B, T], filling a KV cache of cache_len slots per micro-batch: the
        last position's logits [B, V], the DEPState to decode from, and the step's record."""
        B, T = tokens_BT.shape
        micro, states = self._prefill_micro_batches(tokens_BT, mask_BT, schedule.micro_batches, cache_len=cache_len)
        step = self._execute(micro, schedule)
        states = tuple(dataclasses.replace(st, cache=mb.cache) for st, mb in zip(states, micro))
        return step.logits[:B, -1], DEPState(states, B, cache_len, schedule), step

    def decode_step(self, state: DEPState, tokens_B):
        """One token per slot (checked, [batch] int32) through the model under the state's schedule: logits
        [batch, V], the next DEPState (`state` is consumed: its caches are donated) and the step's record. Live
        rows write their token at their own write position and advance by one; free slots and batch padding
        route nothing."""
        size = state.rows_per_micro
        tokens = np.full((len(state.micro) * size, 1), self.cfg.pad_token_id, np.int32)
        tokens[:state.batch, 0] = tokens_B
        micro, after = [], []
        for m, st in enumerate(state.micro):
            mask, positions, valid, next_state = self._decode_glue(dataclasses.replace(st, cache=None))
            after.append(next_state)
            micro.append(_MicroBatch(jax.device_put(tokens[m * size:(m + 1) * size], self._batch), positions, valid,
                                     mask, st.write_index_B, st.cache, decode=True, last_only=True))
        step = self._execute(micro, state.schedule)
        states = tuple(dataclasses.replace(st, cache=mb.cache) for mb, st in zip(micro, after))
        return step.logits[:state.batch, -1], DEPState(states, state.batch, state.cache_len, state.schedule), step

    # Decode slots -----------------------------------------------------------------------------------------------

    def empty_state(self, num_slots: int, cache_len: int, schedule: DEPSchedule) -> DEPState:
        """num_slots free slots of cache_len entries: r1 micro-batches of ag * ma rows (ma = ceil(num_slots /
        (r1 * ag)); the rows past num_slots are padding, never used), each split over the attention group."""
        r1, ag = schedule.micro_batches, self.groups.ag
        size = ag * math.ceil(num_slots / (r1 * ag))
        micro = tuple(dataclasses.replace(self._empty_rows(rows=size, cache_len=cache_len),
                                          cache=self._empty_cache(size, cache_len)) for _ in range(r1))
        return DEPState(micro, num_slots, cache_len, schedule)

    def insert(self, state: DEPState, new: DEPState, src_rows, slots) -> DEPState:
        """Rows src_rows of a prefilled DEPState (its cache no longer than the slots') into the given slots of a
        decode state (`state` is consumed): row r of `new` is row r % size' of its micro-batch r // size', slot s
        row s % size of micro-batch s // size; their cache entries land at [0, T') and their lengths, positions
        and activity come along (engine.insert_rows on each micro-batch pair involved)."""
        src_rows, slots = np.asarray(src_rows, np.int64).reshape(-1), np.asarray(slots, np.int64).reshape(-1)
        if src_rows.shape != slots.shape:
            raise RequestError(f"insert: {src_rows.size} source rows for {slots.size} slots")
        if new.cache_len > state.cache_len:
            raise RequestError(f"insert: the prefilled cache ({new.cache_len} entries) is longer than the slots' "
                               f"({state.cache_len})")
        _check_rows(src_rows, new.batch, "source rows")
        _check_rows(slots, state.batch, "slots")
        if len(set(slots.tolist())) != slots.size:
            raise RequestError(f"insert: slots {slots.tolist()} repeat a slot")
        size, new_size = state.rows_per_micro, new.rows_per_micro
        micro = list(state.micro)
        for m in np.unique(slots // size).tolist():
            into = slots // size == m
            for n in np.unique(src_rows[into] // new_size).tolist():
                pick = into & (src_rows // new_size == n)
                micro[m] = self._insert_rows(micro[m], new.micro[n], jnp.asarray(src_rows[pick] % new_size, jnp.int32),
                                             jnp.asarray(slots[pick] % size, jnp.int32))
        return DEPState(tuple(micro), state.batch, state.cache_len, state.schedule)

    def release(self, state: DEPState, slots) -> DEPState:
        """Frees slots (`state` is consumed): inactive (they route nothing), empty, written from 0 again."""
        slots = np.asarray(slots, np.int64).reshape(-1)
        _check_rows(slots, state.batch, "slots")
        size = state.rows_per_micro
        micro = list(state.micro)
        for m in np.unique(slots // size).tolist():
            micro[m] = self._release_rows(micro[m], jnp.asarray(slots[slots // size == m] % size, jnp.int32))
        return DEPState(tuple(micro), state.batch, state.cache_len, state.schedule)

    @staticmethod
    def longest(state: DEPState) -> int:
        """The largest write position among the live rows (0 when none is live)."""
        return max((int(np.asarray(st.write_index_B)[np.asarray(st.active_B)].max(initial=0)) for st in state.micro),
                   default=0)

    def _prefill_micro_batches(self, tokens_BT, mask_BT, r1: int, *, cache_len: int | None):
        """The batch cut into r1 micro-batches of ag * ma sequences (the rows past B are padding: no token), each
        split over the attention group, with the Engine's prefill inputs and (with cache_len) an empty KV cache;
        and each micro-batch's DecodeState after the prefill (its cache still to be filled)."""
        B, T = tokens_BT.shape
        ag = self.groups.ag
        ma = math.ceil(B / (r1 * ag))
        ma = ma if self.buckets is None else self.buckets.batch_size(ma)
        size, pad = ag * ma, r1 * ag * ma - B
        tokens = np.concatenate([tokens_BT, np.full((pad, T), self.cfg.pad_token_id, np.int32)])
        valid = np.concatenate([mask_BT, np.zeros((pad, T), bool)])
        micro, states = [], []
        for m in range(r1):
            tokens_m, valid_m = (jax.device_put(a[m * size:(m + 1) * size], self._batch) for a in (tokens, valid))
            positions, mask, write_index, state = self._prefill_glue(valid_m, cache_len=cache_len or T)
            cache = None if cache_len is None else self._empty_cache(size, cache_len)
            micro.append(_MicroBatch(tokens_m, positions, valid_m, mask, write_index, cache,
                                     last_only=cache_len is not None))
            states.append(state)
        return micro, states

    def _empty_cache(self, rows: int, length: int) -> list[dict]:
        """A micro-batch's KV cache, zeros [rows, length, ...] per layer, split over the attention group."""
        return [{name: jnp.zeros((rows, length) + shape[2:], self.cfg.jnp_dtype, device=self._batch)
                 for name, shape in spec.items()} for spec in self._cache_spec]

    def _execute(self, micro: list[_MicroBatch], schedule: DEPSchedule, *, serialize: bool = False) -> _Step:
        """Walks the schedule's tasks over the micro-batches (asynchronously, or blocking after each task)."""
        pack = steps.Pack(tuple(self.groups.placement.owner().tolist()),
                          tuple(self.groups.placement.slot().tolist()), self.groups.eg, self.groups.placement.slots,
                          schedule.segments)
        log = transfer.TransferLog()
        tokens_per_expert = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        tasks = schedule.tasks(layer_kinds(self.cfg), shared=self._has_shared)
        issued = []
        start = time.perf_counter()

        def dispatch(task):
            issued.append((task.name, time.perf_counter() - start))
            produced = self._run(task, micro[task.micro], pack, log, tokens_per_expert)
            if serialize:
                jax.block_until_ready(produced)

        if serialize:
            for task in tasks:
                dispatch(task)
        else:
            _Dispatcher(tasks, dispatch, lambda t: self._waits_on(t, micro[t.micro])).run()
        logits = jnp.concatenate([mb.logits for mb in micro])
        logits.block_until_ready()
        return _Step(logits, tokens_per_expert, log, time.perf_counter() - start, issued)

    @staticmethod
    def _waits_on(task: TaskRef, mb: _MicroBatch) -> list:
        """Arrays the host would wait for to dispatch the task: A2E reads its routing counts; E2A slices the
        expert output (on the CPU client a small program on an unfinished input runs inline, i.e. blocks)."""
        if task.kind == "a2e":
            return [mb.counts_device]
        if task.kind == "e2a":
            return [mb.expert_rows[task.segment]]
        return []

    def _run(self, task: TaskRef, mb: _MicroBatch, pack: steps.Pack, log: transfer.TransferLog,
             tokens_per_expert: np.ndarray):
        """Dispatches one task; returns what it produced (for serialize)."""
        groups, layer = self.groups, task.layer
        if task.kind == "embed":
            mb.x = steps.embed(*self._top, mb.tokens, mesh=self._mesh)
            return mb.x
        if task.kind == "head":
            mb.logits = steps.head(*self._top, mb.x, mesh=self._mesh, last_only=mb.last_only)
            return mb.logits
        graphdef, state, weights = self._layers[layer] if layer >= 0 else (None, None, None)
        cache = None if mb.cache is None or task.kind not in ("dense", "attention") else mb.cache[layer]
        if task.kind == "dense":
            mb.x, cache = steps.dense(graphdef, state, mb.x, mb.positions, mb.valid, mb.mask, cache, mb.write_index,
                                      mesh=self._mesh, decode=mb.decode)
            if mb.cache is not None:
                mb.cache[layer] = cache
            return mb.x
        if task.kind == "attention":
            mb.h, mb.moe_in, ids, mb.weights, cache = steps.attention(
                graphdef, *state, mb.x, mb.positions, mb.mask, cache, mb.write_index, mesh=self._mesh,
                decode=mb.decode)
            if mb.cache is not None:
                mb.cache[layer] = cache
            mb.x_sorted, mb.order, mb.counts_device = steps.sort_rows(mb.moe_in, ids, mb.valid, mesh=self._mesh,
                                                                      pack=pack)
            mb.counts_device.copy_to_host_async()
            return mb.h, mb.moe_in, mb.x_sorted
        if task.kind == "shared":
            mb.shared = steps.shared(graphdef, *state, mb.moe_in, mesh=self._mesh)
            return mb.shared
        if task.kind == "a2e":
            if mb.counts is None:  # the layer's first A2E (of all segments, or of segment 0) reads the counts
                mb.counts = np.asarray(mb.counts_device)  # [ag, eg, r2, slots]: waits for this attention task only
                tokens_per_expert[self._moe_index[layer]] += self._expert_counts(mb.counts)
                mb.pieces, mb.returned = {}, []
            pieces = transfer.a2e(log, layer, task.micro, task.segment, mb.x_sorted, mb.counts,
                                  groups.attention_devices, groups.expert_devices)
            mb.pieces.update(pieces)
            return [p for per_j in pieces.values() for per_a in per_j for per_e in per_a for _, p in per_e]
        if task.kind == "experts":
            j = task.segment
            buffers = transfer.gather_segment(mb.pieces.pop(j), mb.counts, j, groups.expert_devices,
                                              mb.x_sorted.shape[1], mb.x_sorted.dtype)
            R = buffers[0].shape[0]
            rows = jax.make_array_from_single_device_arrays((groups.eg * R, buffers[0].shape[1]), self._slots,
                                                            buffers)
            counts_EAS = np.ascontiguousarray(mb.counts[:, :, j, :].transpose(1, 0, 2))  # [eg, ag, slots]
            for e in range(groups.eg):
                log.add("counts", layer, task.micro, j, -1, e, 0, counts_EAS[e].nbytes)
            counts_EAS = jax.device_put(counts_EAS, self._slots)
            mb.expert_rows[j] = steps.experts(*weights, rows, counts_EAS, step=self._expert_step)
            return mb.expert_rows[j]
        if task.kind == "e2a":
            pieces = transfer.e2a(log, layer, task.micro, task.segment, mb.expert_rows.pop(task.segment), mb.counts,
                                  groups.attention_devices, groups.expert_devices)
            mb.returned.extend(pieces)
            return [piece for _, _, piece in pieces]
        if task.kind == "combine":
            rows, dim = mb.x_sorted.shape[0] // groups.ag, mb.x_sorted.shape[1]
            buffers = transfer.assemble(mb.returned, groups.attention_devices, rows, dim, mb.x_sorted.dtype)
            y_sorted = jax.make_array_from_single_device_arrays((groups.ag * rows, dim), self._batch, buffers)
            mb.x = steps.combine_layer(graphdef, *state, mb.h, mb.shared, y_sorted, mb.order, mb.weights,
                                       mesh=self._mesh)
            mb.h = mb.moe_in = mb.weights = mb.x_sorted = mb.order = mb.shared = None
            mb.pieces = mb.returned = mb.counts = None
            return mb.x
        raise RuntimeError(f"unknown task kind {task.kind!r}")

    def _expert_counts(self, counts: np.ndarray) -> np.ndarray:
        """[E] assignments per expert from the [ag, eg, r2, slots] counts."""
        per_slot = counts.sum(axis=(0, 2)).reshape(-1)          # [eg * slots]
        table = self.groups.placement.expert_of_slot()
        out = np.zeros(self.cfg.num_experts, np.int64)
        np.add.at(out, table[table >= 0], per_slot[table >= 0])
        return out


def _check_rows(rows: np.ndarray, batch: int, what: str) -> None:
    bad = rows[(rows < 0) | (rows >= batch)]
    if bad.size:
        raise RequestError(f"{what} {bad.tolist()[:10]} outside the state's {batch} rows")
