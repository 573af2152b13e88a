"""Expert Pipeline Scheduler: calibrated cost models, a timeline simulator and the plan search (EPS-MoE).

    from epsjax import scheduler
    plan = scheduler.plan_for(cfg, mesh.shape, batch, seq_len, tokens_per_expert=None, hardware="h800")

Files, one job each:
    hardware_spec.py  the Hardware record the cost models read (fields, units, link rates per direction)
    hardware.py     public hardware numbers with sources (H100, H800, H200, H20, A100, A6000, A10)
    costs.py        alpha-beta models: GEMM backends (preset roofline or fitted profile tables), links, copies
    layer_costs.py  one layer's operations (attention prefill, router, permute, FFNs) from a ModelConfig
    simulator.py    tasks on streams with dependencies -> timeline, Gantt PNG, Perfetto trace
    schedules.py    the task graph of one layer: TP+TP, TP/DP+EP, the EPS pipeline (PN stages, SM split)
    step.py         a whole prefill step: layers added up, throughput, weight memory
    search.py       plan search over PN, split, backends/tilings and SMs for communication
    plan.py         the scheduler's Plan and its conversion to sharding.plan.ExpertPlan
    histogram.py    RoutingHistogram: moving per-expert token counts from MoEStats
    planner.py      plan_for and Planner: what the runtime calls; predict_prefill (a whole prefill's time);
                    plan_prefill (one search and its prefill prediction, for epsjax.deployment)
    calibration.py  measured constants per device kind (scripts/gpu_check.py writes them), applied to presets
"""

from epsjax.scheduler.costs import CostModel, GemmModel
from epsjax.scheduler.hardware import PRESETS as HARDWARE, Hardware, get_hardware, hardware_for_device_kind
from epsjax.scheduler.histogram import RoutingHistogram
from epsjax.scheduler.plan import Plan
from epsjax.scheduler.planner import (Planner, PrefillPlan, layout_for, plan_for, plan_prefill, predict_prefill,
                                      search_for)
from epsjax.scheduler.schedules import Layout, Workload, build_layer
from epsjax.scheduler.search import PlanChoice, search_plan
from epsjax.scheduler.simulator import Schedule, Task, Timeline, chrome_trace, gantt, simulate, write_trace
from epsjax.scheduler.step import StepResult, simulate_step

__all__ = [
    "CostModel", "GemmModel", "HARDWARE", "Hardware", "Layout", "Plan", "PlanChoice", "Planner", "RoutingHistogram",
    "Schedule", "StepResult", "Task", "Timeline", "Workload", "build_layer", "chrome_trace", "gantt", "get_hardware",
    "hardware_for_device_kind", "layout_for", "plan_for", "plan_prefill", "predict_prefill", "PrefillPlan", "search_for", "search_plan", "simulate",
    "simulate_step", "write_trace",
]
