"""A timing model of offloaded decoding: routing traces replayed through the real cache engine on a virtual clock.

`replay` (simulate.py) drives `ExpertCacheEngine` exactly as `OffloadEngine._forward` does — begin_step with the
forecast, per MoE layer demand() waves, end_layer — but with `VirtualTransfers`: a host -> device copy engine that
takes `CostModel.host_to_device(bytes_per_expert)` per expert (pinned PCIe, preset or calibrated), one copy at a
time in start order, beside a compute stream whose work is priced by the scheduler's cost models (`DecodeCosts`).
So the hit/miss/prefetch decisions are the runtime's own, and only the clock is modelled:

    compute stream   [predictor] -> per layer: attention + router -> expert waves -> combine  ... -> LM head
    copy stream      prefetches (in the engine's order) and misses (priority), at most max_inflight in flight

What overlaps, as the runtime achieves it: the host dispatches asynchronously and keeps pumping the transfer queues
while the device computes (OffloadEngine's wait_until), so a copy starts as soon as the window has room and
overlaps any compute; a wave waits for the copies of its experts (`wait`), and with split_hits the resident
experts of a layer run while its misses copy. Not modelled: copies slowing the compute's HBM traffic, the
host's own Python time per layer (measured separately: scripts/profile_offload.py), and the predictor running
off the compute stream (it is charged in full before the first layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from epsjax.scheduler import layer_costs
from epsjax.scheduler.costs import CostModel
from epsjax.models.config import ModelConfig

Key = tuple[int, int]


class VirtualClock:
    """The compute stream's time in seconds; `stall` accumulates time spent waiting for copies."""

    def __init__(self):
        self.now = 0.0
        self.stall = 0.0


class VirtualTransfers:
    """`Transfers` (cache.py) on a virtual clock: one copy engine, `seconds_per_expert` per copy, FIFO in start
    order. A copy is ready once the clock has passed its end; `wait` advances the clock (a stall)."""

    def __init__(self, clock: VirtualClock, seconds_per_expert: float):
        self.clock, self.seconds_per_expert = clock, seconds_per_expert
        self.copy_free = 0.0
        self.done_at: dict[Key, float] = {}
        self.copy_seconds = 0.0

    def start(self, key: Key, slot: int) -> None:
        begin = max(self.clock.now, self.copy_free)
        self.copy_free = begin + self.seconds_per_expert
        self.done_at[key] = self.copy_free
        self.copy_seconds += self.seconds_per_expert

    def ready(self, key: Key) -> bool:
        return self.done_at[key] <= self.clock.now

    def wait(self, key: Key) -> None:
        self._advance(self.done_at[key])

    def install(self, key: Key, slot: int) -> None:
        del self.done_at[key]

    def staging_count(self) -> int:
        return len(self.done_at)

    def wait_staging(self) -> None:
        self._advance(min(self.done_at.values()))

    def next_done(self) -> float | None:
        return min(self.done_at.values(), default=None)

    def _advance(self, t: float) -> None:
        if t > self.clock.now:
            self.clock.stall += t - self.clock.now
            self.clock.now = t


def compute(engine, seconds: float) -> None:
    """Runs `seconds` of work on the compute stream; meanwhile the host keeps the copy queues moving: at every copy
    completion inside the interval the engine installs it and starts the next (OffloadEngine's wait_until)."""
    transfers, clock = engine.transfers, engine.transfers.clock
    end = clock.now + seconds
    while True:
        t = transfers.next_done()
        if t is None or t > end:
            break
        clock.now = max(clock.now, t)
        if not engine.pump() and transfers.next_done() == t:
            break  # cannot progress (window full of not-yet-installed copies): finish the interval
    clock.now = end


@dataclasses.dataclass(frozen=True)
class DecodeCosts:
    """Seconds of one decode step's pieces for a batch of B sequences at `context` cached tokens, on one device
    (the scheduler's cost models: GEMMs by the grouped/dense fits or presets, memory passes at HBM rate)."""

    cfg: ModelConfig
    costs: CostModel
    batch: int
    context: int

    @property
    def expert_bytes(self) -> int:
        return 3 * self.cfg.d_model * self.cfg.expert_ffn_dim * self.costs.weight_itemsize

    def h2d_seconds(self) -> float:
        return self.costs.host_to_device(self.expert_bytes)

    # The pieces are priced once per instance (a replay asks for them at every layer of every step).

    def attention(self) -> float:
        return self._attention

    def finish(self) -> float:
        return self._finish

    def dense_layer(self) -> float:
        return self._dense_layer

    def head(self) -> float:
        return self._head

    @functools.cached_property
    def _attention(self) -> float:
        """Norms, projections, the core over the KV cache (its bytes read once) and residuals, router, sort."""
        cfg, c, B = self.cfg, self.costs, self.batch
        t = layer_costs.attention_time(c, cfg, B, seq_len=1, context=self.context)
        t += c.memory_pass(B * self.context * kv_bytes_per_token(cfg, c.itemsize))
        return t + layer_costs.router_time(c, cfg, B) + layer_costs.permute_time(c, cfg, B)

    def experts(self, rows_per_expert) -> float:
        """One grouped-FFN wave: rows [n] of the experts it runs (their weights are read once each)."""
        key = tuple(sorted(int(r) for r in rows_per_expert))
        cache = self.__dict__.setdefault("_experts_cache", {})
        if key not in cache:
            model = self.costs.gemm_model(self.costs.hw.grouped_backend if self.costs.hw.grouped_backend in
                                          self.costs.backends else self.costs.backends[0])
            cache[key] = model.ffn_time(np.asarray(key), self.cfg.d_model, self.cfg.expert_ffn_dim) if key else 0.0
        return cache[key]

    @functools.cached_property
    def _finish(self) -> float:
        """Un-permute and combine, shared experts (DeepSeek) or the dense residual MLP (Arctic)."""
        cfg, c, B = self.cfg, self.costs, self.batch
        return (layer_costs.unpermute_time(c, cfg, B)
                + layer_costs.dense_ffn_time(c, B, cfg.d_model, layer_costs.side_ffn_width(cfg)))

    @functools.cached_property
    def _dense_layer(self) -> float:
        cfg, c = self.cfg, self.costs
        return self.attention() + layer_costs.dense_ffn_time(c, self.batch, cfg.d_model, cfg.dense_ffn_dim)

    @functools.cached_property
    def _head(self) -> float:
        return layer_costs.lm_head_time(self.costs, self.cfg, self.batch)

    def device_step(self, rows_LE: np.ndarray) -> float:
        """A step with every expert resident: rows_LE [L_moe, E] tokens per expert per MoE layer."""
        n_dense = self.cfg.num_layers - len(self.cfg.moe_layers)
        t = n_dense * self.dense_layer() + self.head()
        for rows_E in rows_LE:
            t += self.attention() + self.experts(rows_E[rows_E > 0]) + self.finish()
        return t


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """KV cache bytes of one token in one layer: K and V heads, or MLA's compressed latent and rotary key."""
    if cfg.mla is not None:
        return (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * itemsize
    return 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def offload_slots(cfg: ModelConfig, budget_fraction: float, max_inflight: int) -> int:
    """Pool slots for a budget (a fraction of all routed-expert bytes), staging buffers inside it (as the runtime)."""
    total = len(cfg.moe_layers) * cfg.num_experts
    return min(int(math.floor(budget_fraction * total)) - max_inflight, total)
