"""DEP decoding as an executor of the generation layer: a DEPRuntime's prefill and decode steps behind a Generator.

    engine = runtime.engine(DEPSchedule.findep(2, 2, "AASS"))      # or runtime.generate(prompts, schedule=...)
    result = engine.generate(prompts, max_new_tokens=16, sampling=SamplingParams())   # a GenerateResult
    slots = engine.open_slots(num_slots=8, cache_len=256)            # continuous batching (generation.DecodeSlots)

DEPEngine is an epsjax.generation.Generator (as epsjax.engine.Engine is): request checks, left padding, shape
buckets, per-request sampling (each request its own stream), EOS / stop tokens, decode slots and GenerateResult come
from there; DEPExecutor only runs the model. Each prefill and decode step is one DEP step under the schedule: the
batch is cut into r1 micro-batches over sequences, and every layer's attention on the attention group reads and
writes that micro-batch's KV cache (kept there, [ag * ma, S, ...] split like the micro-batch), while its routed rows
go to the expert group and back exactly as in a prefill. A decode step is the same task graph with one token per
sequence. DEP has no on-device decode loop (each step is a schedule walked from the host), so the Generator decodes
a step at a time.

A decode state is a set of slots: r1 micro-batches of ag * ma rows, slot i being row i % (ag * ma) of micro-batch
i // (ag * ma). Each row has its own cache length, write and rotary positions, so a prefilled request (from a
prefill of a few prompts, whatever its micro-batch size) is inserted into a free slot while the others decode, and
a finished slot is released (inactive: it routes nothing) and reused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epsjax.dep.schedule import DEPSchedule
from epsjax.engine import DecodeState
from epsjax.generation import Generator, RequestError
from epsjax.models import MoEStats


@dataclasses.dataclass(frozen=True)
class DEPState:
    """What a DEP decode step continues from: a set of `batch` slots."""

    micro: tuple[DecodeState, ...]   # per micro-batch: its KV cache and decode state (write_index_B per row),
                                     # [ag * ma, ...] split over the attention group
    batch: int                       # rows the caller sees (slot i: micro-batch i // rows_per_micro, row i % it;
                                     # the micro-batches' rows past it are padding)
    cache_len: int                   # cache slots per sequence
    schedule: DEPSchedule            # every step runs under it (the state has its r1 micro-batches)

    @property
    def rows_per_micro(self) -> int:
        return self.micro[0].kv_valid_BS.shape[0]


class DEPExecutor:
    """A DEPRuntime and a schedule under epsjax.generation's executor contract (no run_loop: DEP steps are walked
    from the host). Every step's A2E / E2A record (transfer.TransferLog) is kept in transfer_logs, in order."""

    batch_multiple = 1  # DEP pads its micro-batches itself

    def __init__(self, runtime, schedule: DEPSchedule):
        if not isinstance(schedule, DEPSchedule):
            raise RequestError(f"schedule must be a DEPSchedule, got {type(schedule).__name__}")
        self.runtime, self.schedule, self.cfg = runtime, schedule, runtime.cfg
        self.transfer_logs = []

    def check_state(self, state) -> None:
        if not isinstance(state, DEPState):
            raise RequestError(f"state must be the DEPState prefill or decode_step returned, got "
                               f"{type(state).__name__}")

    @staticmethod
    def cache_shape(state: DEPState) -> tuple[int, int]:
        return state.batch, state.cache_len

    def longest(self, state: DEPState) -> int:
        return self.runtime.longest(state)

    def run_prefill(self, tokens_BT, mask_BT, *, cache_len: int, all_logits: bool = False):
        """Last-position logits [B, V], the DEPState and the MoE statistics (inputs checked by the Generator)."""
        if all_logits:
            raise RequestError("a DEP prefill with a KV cache returns the last position's logits; "
                               "DEPRuntime.prefill gives every position's")
        logits_BV, state, step = self.runtime.prefill_with_cache(tokens_BT, mask_BT, cache_len=cache_len,
                                                                 schedule=self.schedule)
        return logits_BV, state, self._stats(step)

    def run_step(self, state: DEPState, tokens_B):
        """One token per slot: logits [batch, V], the next DEPState (`state` is consumed), MoE statistics."""
        logits_BV, state, step = self.runtime.decode_step(state, np.asarray(tokens_B, np.int32))
        return logits_BV, state, self._stats(step)

    def empty_state(self, num_slots: int, cache_len: int) -> DEPState:
        return self.runtime.empty_state(num_slots, cache_len, self.schedule)

    def insert(self, state: DEPState, new: DEPState, src_rows, slots) -> DEPState:
        self.check_state(state)
        self.check_state(new)
        return self.runtime.insert(state, new, src_rows, slots)

    def release(self, state: DEPState, slots) -> DEPState:
        self.check_state(state)
        return self.runtime.release(state, slots)

    def _stats(self, step) -> MoEStats:
        self.transfer_logs.append(step.transfers)
        return MoEStats(tokens_per_expert=step.tokens_per_expert,
                        dropped=np.zeros(len(self.cfg.moe_layers), np.int64))  # dropless


class DEPEngine(Generator):
    """A DEPRuntime under a schedule as a Generator: prefill, decode_step, generate, open_slots (module
    docstring). Shape buckets are the runtime's."""

    def __init__(self, runtime, schedule: DEPSchedule = DEPSchedule.naive()):
        super().__init__(DEPExecutor(runtime, schedule), buckets=runtime.buckets)

    @property
    def runtime(self):
        return self.executor.runtime

    @property
    def schedule(self) -> DEPSchedule:
        return self.executor.schedule

    @property
    def transfer_logs(self) -> list:
        """Every step's A2E / E2A record (transfer.TransferLog), in order."""
        return self.executor.transfer_logs
