"""The DEP runtime: a model split over an attention group and an expert group, run by a schedule.

    groups = DEPGroups.split(attention=3, experts=5, num_experts=cfg.num_experts)
    runtime = DEPRuntime(model, groups)
    out = runtime.prefill(tokens, mask, schedule=DEPSchedule.findep(micro_batches=2, segments=2, order="AASS"))
    out.logits        # [B, T, V], the single-device model's logits
    out.transfers     # every A2E / E2A piece: rows and bytes

Placement: the embedding, attention, routers, shared experts, dense layers and LM head are replicated over the
attention mesh (attention is data parallel: a micro-batch's sequences are split over its devices); the routed
experts of every MoE layer are stacked into expert slots and split over the expert mesh (groups.py).

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
from epsjax.dep.groups import DEPGroups
from epsjax.dep.schedule import DEPSchedule, TaskRef, layer_kinds
from models.quantize import is_quantized
from models import MoETransformer
from sharding import DATA, EXPERT

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
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
    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    x: jax.Array | None = None
    h: jax.Array | None = None
    moe_in: jax.Array | None = None
    weights: jax.Array | None = None
    x_sorted: jax.Array | None = None
    order: jax.Array | None = None
    counts_device: jax.Array | None = None
    counts: np.ndarray | None = None
    pieces: list | None = None
    returned: list | None = None          # E2A pieces (attention device, row, [n, D]) not yet in place
    shared: jax.Array | None = None
    expert_rows: dict = dataclasses.field(default_factory=dict)
    logits: jax.Array | None = None


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


class DEPRuntime:
    """A MoETransformer placed on DEPGroups; `prefill` runs it under a DEPSchedule.

    backend: the pallas_kernels backend of the expert group's grouped FFN ("auto": the selector's choice).
    buckets: prompt lengths (left-padded further) and micro-batch sizes are rounded up to its ladders, so the
        programs compiled are bounded as the Engine's (epsjax.compilation); None: exact shapes.
    """

    def __init__(self, model: MoETransformer, groups: DEPGroups, *, backend: str = "auto",
                 buckets: ShapeBuckets | None = ShapeBuckets()):
        cfg = model.cfg
        self.buckets = buckets  # prompt lengths and micro-batch sizes rounded up to its ladders (None: exact)
        if is_quantized(model):
            raise ValueError(f"{cfg.name}: the DEP runtime takes float experts; quantized (FP8) experts run on one "
                             "device for now")
        if groups.placement.num_experts != cfg.num_experts:
            raise ValueError(f"groups place {groups.placement.num_experts} experts, {cfg.name} has {cfg.num_experts}")
        self.cfg, self.groups = cfg, groups
        replicated = NamedSharding(groups.attention_mesh, P())
        self._batch = NamedSharding(groups.attention_mesh, P(DATA))
        self._slots = NamedSharding(groups.expert_mesh, P(EXPERT))
        self._expert_step = steps.ExpertStep(groups.expert_mesh, backend)
        self._mesh = groups.attention_mesh

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
        self._has_shared = any(layer.moe is not None and layer.moe.shared is not None for layer in model.layers)
        self._moe_index = {l: i for i, l in enumerate(cfg.moe_layers)}

    def _place_experts(self, w_E__):
        """[E, ...] -> [eg * slots, ...] in slot order (empty slots zero), split over the expert mesh."""
        table = self.groups.placement.expert_of_slot()
        w = jnp.where((table >= 0).reshape((-1,) + (1,) * (w_E__.ndim - 1)), w_E__[np.maximum(table, 0)], 0)
        return jax.device_put(w, self._slots)

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
        ag, r1 = self.groups.ag, schedule.micro_batches
        ma = math.ceil(B / (r1 * ag))
        ma = ma if self.buckets is None else self.buckets.batch_size(ma)
        pad = r1 * ag * ma - B
        tokens = np.concatenate([tokens_BT, np.full((pad, T_run), self.cfg.pad_token_id, np.int32)])
        valid = np.concatenate([mask_BT, np.zeros((pad, T_run), bool)])
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        size = ag * ma
        micro = [_MicroBatch(*(jax.device_put(a[m * size:(m + 1) * size], self._batch)
                               for a in (tokens, positions, valid))) for m in range(r1)]
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
        logits = jnp.concatenate([mb.logits for mb in micro])[:B, T_run - T:]
        logits.block_until_ready()
        return DEPOutput(logits, tokens_per_expert, log, time.perf_counter() - start, issued)

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
        groups, l = self.groups, task.layer
        if task.kind == "embed":
            mb.x = steps.embed(*self._top, mb.tokens, mesh=self._mesh)
            return mb.x
        if task.kind == "head":
            mb.logits = steps.head(*self._top, mb.x, mesh=self._mesh)
            return mb.logits
        graphdef, state, weights = self._layers[l] if l >= 0 else (None, None, None)
        if task.kind == "dense":
            mb.x = steps.dense(graphdef, state, mb.x, mb.positions, mb.valid, mesh=self._mesh)
            return mb.x
        if task.kind == "attention":
            (mb.h, mb.moe_in, mb.weights, mb.x_sorted, mb.order, mb.counts_device) = steps.attention(
                graphdef, *state, mb.x, mb.positions, mb.valid, mesh=self._mesh, pack=pack)
            mb.counts_device.copy_to_host_async()
            return mb.h, mb.moe_in, mb.x_sorted
        if task.kind == "shared":
            mb.shared = steps.shared(graphdef, *state, mb.moe_in, mesh=self._mesh)
            return mb.shared
        if task.kind == "a2e":
            mb.counts = np.asarray(mb.counts_device)  # [ag, eg, r2, slots]: waits for this attention task only
            tokens_per_expert[self._moe_index[l]] += self._expert_counts(mb.counts)
            mb.pieces = transfer.a2e(log, l, task.micro, mb.x_sorted, mb.counts, groups.attention_devices,
                                     groups.expert_devices)
            mb.returned = []
            return [p for row in mb.pieces for per_j in row for p in per_j if p is not None]
        if task.kind == "experts":
            j = task.segment
            buffers = transfer.gather_segment(mb.pieces, mb.counts, j, groups.expert_devices,
                                              mb.x_sorted.shape[1], mb.x_sorted.dtype)
            R = buffers[0].shape[0]
            rows = jax.make_array_from_single_device_arrays((groups.eg * R, buffers[0].shape[1]), self._slots,
                                                            buffers)
            counts_EAS = np.ascontiguousarray(mb.counts[:, :, j, :].transpose(1, 0, 2))  # [eg, ag, slots]
            for e in range(groups.eg):
                log.add("counts", l, task.micro, j, -1, e, 0, counts_EAS[e].nbytes)
            counts_EAS = jax.device_put(counts_EAS, self._slots)
            mb.expert_rows[j] = steps.experts(*weights, rows, counts_EAS, step=self._expert_step)
            return mb.expert_rows[j]
        if task.kind == "e2a":
            pieces = transfer.e2a(log, l, task.micro, task.segment, mb.expert_rows.pop(task.segment), mb.counts,
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
        raise ValueError(f"unknown task kind {task.kind!r}")

    def _expert_counts(self, counts: np.ndarray) -> np.ndarray:
        """[E] assignments per expert from the [ag, eg, r2, slots] counts."""
        per_slot = counts.sum(axis=(0, 2)).reshape(-1)          # [eg * slots]
        table = self.groups.placement.expert_of_slot()
        out = np.zeros(self.cfg.num_experts, np.int64)
        np.add.at(out, table[table >= 0], per_slot[table >= 0])
        return out
