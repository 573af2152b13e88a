"""A whole prefill step of a model: its layers' simulated times added up, throughput, weight memory.

Layers run one after the other (layer l + 1's attention needs layer l's output), so the step time is the sum of
the layers' makespans: MoE layers x the simulated MoE layer, dense layers (DeepSeek-V2's first) x the simulated
dense layer, plus the logits of each sequence's last position. Routing shares may differ per layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epsjax.scheduler import layer_costs as lc
from epsjax.scheduler.costs import CostModel
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.plan import Plan
from epsjax.scheduler.schedules import Workload, build_layer
from epsjax.scheduler.simulator import Timeline, simulate


@dataclasses.dataclass(frozen=True)
class StepResult:
    step_s: float
    moe_layer_s: float          # mean over MoE layers
    dense_layer_s: float
    lm_head_s: float
    tokens: int
    timeline: Timeline          # one MoE layer (the first with per-layer loads)

    @property
    def throughput(self) -> float:
        return self.tokens / self.step_s

    def as_dict(self) -> dict:
        return {"step_s": self.step_s, "tokens": self.tokens, "tokens_per_s": self.throughput,
                "moe_layer_s": self.moe_layer_s, "dense_layer_s": self.dense_layer_s, "lm_head_s": self.lm_head_s,
                "moe_layer_breakdown_s": self.timeline.by_kind()}


def simulate_step(w: Workload, costs: CostModel, plan: Plan = Plan(), *,
                  layer_loads: np.ndarray | None = None) -> StepResult:
    """The step time of the workload's model. layer_loads: [MoE layers, E] routing shares (None: w's shares
    for every layer)."""
    cfg, lay = w.cfg, w.layout
    n_moe = len(cfg.moe_layers)
    if layer_loads is None:
        first = simulate(build_layer(w, costs, plan))
        moe_total = n_moe * first.makespan
    else:
        layer_loads = np.asarray(layer_loads)
        if layer_loads.shape != (n_moe, cfg.num_experts):
            raise ScheduleError(f"layer_loads must be [{n_moe}, {cfg.num_experts}], got {layer_loads.shape}")
        spans = [simulate(build_layer(w.replace(expert_load=tuple(l)), costs, plan)) for l in layer_loads]
        first, moe_total = spans[0], sum(t.makespan for t in spans)
    n_dense = cfg.num_layers - n_moe
    dense_s = simulate(build_layer(w, costs, plan, dense=True)).makespan if n_dense else 0.0
    sequences = max(1, int(round(w.tokens / w.seq_len / lay.attention_dp)))
    head_s = lc.lm_head_time(costs, cfg, sequences, lay.attention_tp)
    step = moe_total + n_dense * dense_s + head_s
    return StepResult(step, moe_total / max(n_moe, 1), dense_s, head_s, w.tokens, first)


def weight_bytes_per_device(w: Workload, costs: CostModel) -> float:
    """Parameter bytes one device holds: routed experts split over the MoE group, the rest split over the
    attention TP group (replicated under data-parallel attention); embeddings split over TP."""
    counts = w.cfg.param_counts()
    lay = w.layout
    experts = counts["routed_experts"] / lay.devices if lay.moe == "ep" else counts["routed_experts"] / lay.attention_tp
    rest = (counts["total"] - counts["routed_experts"]) / lay.attention_tp
    return (experts + rest) * costs.weight_itemsize
