"""DEP decoding under the Engine's contract: a DEPRuntime's prefill and decode steps behind Engine's generate.

    engine = runtime.engine(DEPSchedule.findep(2, 2, "AASS"))      # or runtime.generate(prompts, schedule=...)
    result = engine.generate(prompts, max_new_tokens=16, sampling=SamplingParams())   # an engine.GenerateResult

DEPEngine is an epsjax.engine.Engine (as epsjax.offload's engine is): the Engine's request checks, left padding,
shape buckets, sampling (fold_in(key, step) per token), EOS bookkeeping and GenerateResult come from there
unchanged; only prefill and decode_step differ. Each runs one DEP step under the schedule: the batch is cut into
r1 micro-batches over sequences, and every layer's attention on the attention group reads and writes that
micro-batch's KV cache (kept there, [ag * ma, S, ...] split like the micro-batch), while its routed rows go to the
expert group and back exactly as in a prefill. A decode step is the same task graph with one token per sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epsjax.dep.schedule import DEPSchedule
from epsjax.engine import DecodeState, Engine, RequestError
from epsjax.models import MoEStats


@dataclasses.dataclass(frozen=True)
class DEPState:
    """What a DEP decode step continues from."""

    micro: tuple[DecodeState, ...]   # per micro-batch: its KV cache and Engine decode state, [ag * ma, ...]
    batch: int                       # rows the caller sees (the micro-batches' rows past it are padding)
    cache_len: int                   # cache slots per sequence
    write_index: int                 # the next cache slot (shared by the batch: prompts are left-padded)
    schedule: DEPSchedule            # every step of the request runs under it (the cache follows its r1)


class DEPEngine(Engine):
    """A DEPRuntime with the Engine's prefill / decode_step / generate contract (module docstring)."""

    _decode_tokens = Engine._decode_tokens_on_host  # each step is a schedule walked from the host

    def __init__(self, runtime, schedule: DEPSchedule = DEPSchedule.naive()):
        if not isinstance(schedule, DEPSchedule):
            raise RequestError(f"schedule must be a DEPSchedule, got {type(schedule).__name__}")
        self.runtime, self.schedule = runtime, schedule
        self.cfg, self.buckets, self.batch_sharding = runtime.cfg, runtime.buckets, None
        self.transfer_logs = []  # every step's A2E / E2A record (transfer.TransferLog), in order

    def prefill(self, tokens_BT, mask_BT=None, *, cache_len: int | None = None, all_logits: bool = False,
                pad_rows: int = 0):
        """Engine.prefill: last-position logits [B, V], the DEPState and the MoE statistics."""
        if all_logits:
            raise RequestError("a DEP prefill with a KV cache returns the last position's logits; "
                               "DEPRuntime.prefill gives every position's")
        tokens_BT, mask_BT, cache_len = self.check_prefill_inputs(tokens_BT, mask_BT, cache_len, pad_rows)
        logits_BV, state, step = self.runtime.prefill_with_cache(tokens_BT, mask_BT, cache_len=cache_len,
                                                                 schedule=self.schedule)
        return logits_BV, state, self._stats(step)

    def decode_step(self, state: DEPState, tokens_B):
        """Engine.decode_step: one token per sequence; logits [B, V], the next DEPState (`state` is consumed)."""
        if not isinstance(state, DEPState):
            raise RequestError(f"state must be the DEPState prefill or decode_step returned, got "
                               f"{type(state).__name__}")
        tokens_B = self.check_decode_inputs(tokens_B, (state.batch, state.cache_len), state.write_index)
        logits_BV, state, step = self.runtime.decode_step(state, tokens_B)
        return logits_BV, state, self._stats(step)

    def _stats(self, step) -> MoEStats:
        self.transfer_logs.append(step.transfers)
        return MoEStats(tokens_per_expert=step.tokens_per_expert,
                        dropped=np.zeros(len(self.cfg.moe_layers), np.int64))  # dropless
