"""A moving histogram of routing: per MoE layer, the share of assignments each expert receives.

The runtime feeds it the `MoEStats.tokens_per_expert` the engine returns (stacked over MoE layers: [L_moe, E],
or [E] for one layer) after each step; the planner reads shares from it and re-plans when they drift.

    hist = RoutingHistogram(num_layers=len(cfg.moe_layers), num_experts=cfg.num_experts)
    hist.update(out.moe_stats.tokens_per_expert)      # jax or numpy array [L_moe, E] or [E]
    hist.shares()        # [L_moe, E], rows sum to 1 (uniform before any update)
    hist.skew()          # fullest expert's share x E, per layer (1.0 = balanced)
"""

from __future__ import annotations

import numpy as np

from epsjax.scheduler.errors import ScheduleError


class RoutingHistogram:
    """Exponential moving average of per-expert token counts, per MoE layer.

    decay: weight of the past per update (0.9: about the last 10 steps count). Counts are kept as an EMA of the
    step's shares weighted by its token count, so a large batch moves the histogram more than a small one.
    """

    def __init__(self, num_layers: int, num_experts: int, *, decay: float = 0.9, prior_tokens: float = 0.0):
        if num_layers < 1 or num_experts < 1:
            raise ScheduleError(f"need num_layers >= 1 and num_experts >= 1, got {num_layers}, {num_experts}")
        if not 0.0 <= decay < 1.0:
            raise ScheduleError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.counts = np.full((num_layers, num_experts), prior_tokens / num_experts, dtype=np.float64)
        self.updates = 0

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    def update(self, tokens_per_expert) -> "RoutingHistogram":
        """Adds one step's counts: [L_moe, E], [E] (applied to every layer), or MoEStats (its field)."""
        counts = getattr(tokens_per_expert, "tokens_per_expert", tokens_per_expert)
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim == 1:
            counts = np.broadcast_to(counts, self.counts.shape)
        if counts.shape != self.counts.shape:
            raise ScheduleError(f"tokens_per_expert must be [{self.num_layers}, {self.num_experts}] or "
                                f"[{self.num_experts}], got {counts.shape}")
        if np.any(counts < 0):
            raise ScheduleError("tokens_per_expert must be non-negative")
        decay = self.decay if self.updates else 0.0
        self.counts = decay * self.counts + (1.0 - decay) * counts
        self.updates += 1
        return self

    def shares(self) -> np.ndarray:
        """[L_moe, E] share of assignments per expert (uniform for layers without counts)."""
        total = self.counts.sum(axis=1, keepdims=True)
        uniform = np.full_like(self.counts, 1.0 / self.num_experts)
        return np.where(total > 0, self.counts / np.where(total > 0, total, 1.0), uniform)

    def mean_shares(self) -> np.ndarray:
        """[E]: the shares averaged over layers."""
        return self.shares().mean(axis=0)

    def skew(self) -> np.ndarray:
        """[L_moe]: the fullest expert's share times E (1.0 = perfectly balanced)."""
        return self.shares().max(axis=1) * self.num_experts

    def distance(self, other_shares: np.ndarray) -> float:
        """Largest total-variation distance between this histogram's layers and other_shares ([L, E] or [E])."""
        other = np.broadcast_to(np.asarray(other_shares, dtype=np.float64), self.counts.shape)
        return float(0.5 * np.abs(self.shares() - other).sum(axis=1).max())
