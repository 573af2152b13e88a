"""Plan search: the pipeline degree, stage split, per-stage backend/tiling and SM split that minimise the
simulated MoE layer time of a workload.

    choice = search_plan(workload, costs)            # PlanChoice
    choice.plan, choice.predicted_s, choice.search_seconds, choice.plan.to_expert_plan()

Candidates: split "experts" with PN = 1 .. local experts (at most max_pipeline), split "tokens" with PN in
token_chunk_options; sm_for_comm in sm_options (0 = no overlap). For each candidate the backend of each stage is
the one whose slowest device finishes the stage's GEMMs first (simulated times are monotone in task durations,
so a stage-wise faster kernel never makes the layer slower); each backend used uniformly for all stages is
tried as well. Every candidate is simulated and the fastest wins; ties go to the simpler plan (smaller PN, fewer
SMs reserved). Load-aware through the workload's expert shares (a routing histogram), or per-layer shares:
then representative layers (median of each third by imbalance) stand in for all, weighted by their third's size,
and a shortlist from the median layer is what gets simulated on all three.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np

from epsjax.scheduler.costs import CostModel
from epsjax.scheduler.plan import Plan
from epsjax.scheduler.schedules import (Workload, build_layer, ep_buffer_rows, expert_ffn_time, noisy_rows,
                                        stage_gemm_times, stage_loads, usable_backends)
from epsjax.scheduler.simulator import simulate

SM_OPTIONS = (0, 8, 16, 24, 32)
TOKEN_CHUNK_OPTIONS = (2, 4, 8)
DENSE_HEADROOM = 1.1  # capacity buckets hold 10% more than the predicted fullest expert


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    """The chosen plan and how it compares.

    predicted_s: simulated MoE layer time of the plan (summed over representative layers x weights, i.e. all
        MoE layers, when per-layer loads were given; else one layer).
    unpipelined_s: the same for the best PN = 1 plan with nothing reserved (the TP/DP + EP baseline).
    best_by_pn: {(split, PN): seconds} of the best candidate at each fixed pipeline degree.
    """

    plan: Plan
    predicted_s: float
    unpipelined_s: float
    best_by_pn: dict
    evaluated: int
    search_seconds: float
    sources: dict
    unpipelined_plan: Plan = Plan()

    @property
    def speedup(self) -> float:
        return self.unpipelined_s / self.predicted_s

    def expert_plan(self):
        return self.plan.to_expert_plan()

    def as_dict(self) -> dict:
        return {"plan": self.plan.as_dict(), "predicted_s": self.predicted_s, "unpipelined_s": self.unpipelined_s,
                "unpipelined_plan": self.unpipelined_plan.as_dict(),
                "speedup_vs_unpipelined": self.speedup, "evaluated": self.evaluated,
                "search_seconds": self.search_seconds, "sources": self.sources,
                "best_by_pn": {f"{s}:{pn}": t for (s, pn), t in sorted(self.best_by_pn.items())}}


def representative_layers(w: Workload, layer_loads: np.ndarray, count: int = 3) -> list[tuple[np.ndarray, float]]:
    """(shares, weight) of up to `count` layers standing for all: the median layer of each imbalance bin."""
    loads = np.asarray(layer_loads, dtype=np.float64)
    loads = loads / loads.sum(axis=1, keepdims=True)
    P = w.layout.devices if w.layout.moe == "ep" else 1
    imbalance = loads.reshape(len(loads), P, -1).sum(-1).max(-1) * P
    order = np.argsort(imbalance, kind="stable")
    bins = [b for b in np.array_split(order, min(count, len(order))) if len(b)]
    return [(loads[b[len(b) // 2]], float(len(b))) for b in bins]


def _tiling(w, costs, plan, stage, backend, tight: bool = True):
    """The tiling fields a stage gets for a backend: Mosaic GPU's persistent grid leaves sm_for_comm SMs free
    (num_sms; the mechanism behind the SM split), DenseGemm gets capacity buckets that hold the predicted fullest
    expert with DENSE_HEADROOM (tight=False: the default buckets instead)."""
    if backend == "mosaic_gpu" and plan.sm_for_comm:
        return {"num_sms": costs.hw.sms - plan.sm_for_comm}
    if backend != "dense" or not tight or w.layout.moe != "ep":
        return None
    return {"capacities": _dense_capacities(w, plan.split, plan.pipeline_degree)[stage]}


@functools.lru_cache(maxsize=4096)
def _dense_capacities(w: Workload, split: str, pipeline_degree: int) -> tuple[tuple[int, ...], ...]:
    """Per stage: the capacity buckets (multiples of 64) that hold each device's predicted fullest expert."""
    loads = stage_loads(w, Plan(pipeline_degree, split))
    total = w.assignments / (len(loads) if split == "tokens" else 1)
    out = []
    for mu in loads:
        fullest = [float(np.max(noisy_rows(m, total), initial=0.0)) for m in mu]
        out.append(tuple(sorted({max(64, int(math.ceil(f * DENSE_HEADROOM / 64)) * 64) for f in fullest})))
    return tuple(out)


def layer_time(w: Workload, costs: CostModel, plan: Plan,
               layers: list[tuple[np.ndarray, float]] | None = None) -> float:
    """Simulated MoE layer time (weighted sum over representative layers when given)."""
    if layers is None:
        return simulate(build_layer(w, costs, plan, collapse=True)).makespan
    return sum(weight * simulate(build_layer(w.replace(expert_load=tuple(shares)), costs, plan,
                                             collapse=True)).makespan
               for shares, weight in layers)


def candidate_shapes(w: Workload, costs: CostModel, *, max_pipeline: int = 32,
                     sm_options=SM_OPTIONS, token_chunks=TOKEN_CHUNK_OPTIONS) -> list[Plan]:
    """Plans without backends: every (split, PN, sm_for_comm) the search considers."""
    sms = [p for p in sm_options if p < costs.hw.sms // 2]
    if w.layout.moe == "tp":
        return [Plan()]
    local = w.cfg.num_experts // w.layout.devices
    shapes = [("experts", pn) for pn in range(1, min(local, max_pipeline) + 1)]
    shapes += [("tokens", pn) for pn in token_chunks if pn <= max_pipeline and w.tokens // w.layout.devices >= pn]
    return [Plan(pn, split, sm_for_comm=p) for split, pn in shapes for p in sms]


def with_backends(w: Workload, costs: CostModel, shape: Plan, layers=None, tight: bool = True) -> list[Plan]:
    """The backend assignments tried for one (split, PN, sm_for_comm): per-stage best, and each uniform."""
    f = w.cfg.expert_ffn_dim // (w.layout.attention_tp if w.layout.moe == "tp" else 1)
    backends = usable_backends(costs, w.cfg.d_model, f)
    ws = [w] if layers is None else [w.replace(expert_load=tuple(s)) for s, _ in layers]
    weights = [1.0] if layers is None else [wt for _, wt in layers]
    plans = []
    stage_times = sum(wt * _stage_backend_times(x, costs, shape, backends, tight) for x, wt in zip(ws, weights))
    best = tuple(backends[i] for i in np.argmin(stage_times, axis=1))
    options = [best] + [(b,) * len(best) for b in backends if (b,) * len(best) != best]
    for names in options:
        uniq = names if len(set(names)) > 1 else names[:1]
        tilings = tuple(_freeze(_merge([_tiling(x, costs, shape, s, names[s], tight) for x in ws]))
                        for s in range(len(names)))
        if len(set(tilings)) == 1:
            tilings = tilings[:1]
        elif len(uniq) == 1:
            uniq = names
        plans.append(dataclasses.replace(shape, backends=uniq, tilings=tilings))
    return plans


def _stage_backend_times(w, costs, plan, backends, tight) -> np.ndarray:
    """[stage, backend] time of the slowest device's expert GEMMs (EP) or of the TP expert GEMM."""
    cfg = w.cfg
    if w.layout.moe == "tp":
        mu = w.tokens / w.layout.attention_dp * cfg.router.top_k * w.shares()
        f = cfg.expert_ffn_dim // w.layout.attention_tp
        return np.array([[expert_ffn_time(costs, b, mu, mu.sum(), cfg.d_model, f) for b in backends]])
    loads = stage_loads(w, plan)
    total = w.assignments / (len(loads) if plan.split == "tokens" else 1)
    return np.array([[stage_gemm_times(costs, b, mu, total, cfg.d_model, cfg.expert_ffn_dim,
                                       sm_for_comm=plan.sm_for_comm, tiling=_tiling(w, costs, plan, s, b, tight),
                                       buffer_rows=ep_buffer_rows(w, plan, mu.shape[1])).max()
                      for b in backends] for s, mu in enumerate(loads)])


def _merge(tilings: list[dict | None]) -> dict | None:
    """One tiling for several loads: the union of their capacity buckets."""
    if tilings[0] is None or "capacities" not in tilings[0]:
        return tilings[0]
    return {"capacities": tuple(sorted({c for t in tilings for c in t["capacities"]}))}


def _freeze(tiling: dict | None):
    return None if tiling is None else tuple(sorted(tiling.items()))


def _better(seconds: float, plan: Plan, best_seconds: float, best_plan: Plan, rel_tol: float = 1e-9) -> bool:
    """Faster, or as fast (within rel_tol) and simpler: smaller PN, then fewer SMs reserved."""
    if seconds < best_seconds * (1 - rel_tol):
        return True
    return (seconds <= best_seconds * (1 + rel_tol)
            and (plan.pipeline_degree, plan.sm_for_comm) < (best_plan.pipeline_degree, best_plan.sm_for_comm))


def search_plan(w: Workload, costs: CostModel, *, layer_loads: np.ndarray | None = None, max_pipeline: int = 32,
                sm_options=SM_OPTIONS, token_chunks=TOKEN_CHUNK_OPTIONS, tight_tilings: bool = True,
                shortlist: int = 12) -> PlanChoice:
    """The fastest plan in simulation (module docstring). tight_tilings=False keeps DenseGemm's default buckets.

    With per-layer loads every candidate is first simulated on the median representative layer only, and the
    `shortlist` fastest (plus the best unpipelined one) on all representative layers; best_by_pn then covers the
    shortlisted candidates."""
    t0 = time.perf_counter()
    layers = representative_layers(w, layer_loads) if layer_loads is not None else None
    candidates = [plan for shape in candidate_shapes(w, costs, max_pipeline=max_pipeline, sm_options=sm_options,
                                                     token_chunks=token_chunks)
                  for plan in with_backends(w, costs, shape, layers, tight_tilings)]
    evaluated = 0
    if layers is not None and len(layers) > 1:
        pivot = [(layers[len(layers) // 2][0], 1.0)]
        first = [layer_time(w, costs, plan, pivot) for plan in candidates]
        evaluated += len(candidates)
        order = np.argsort(first, kind="stable")
        unpipelined_ids = [i for i in order if candidates[i].pipeline_degree == 1 and not candidates[i].sm_for_comm]
        keep = sorted(set(order[:shortlist].tolist()) | set(unpipelined_ids[:1]))
        candidates = [candidates[i] for i in keep]
    best: tuple[float, Plan] | None = None
    best_by_pn: dict = {}
    unpipelined, unpipelined_plan = math.inf, Plan()
    for plan in candidates:
        seconds = layer_time(w, costs, plan, layers)
        evaluated += 1
        key = (plan.split if plan.pipeline_degree > 1 else "experts", plan.pipeline_degree)
        best_by_pn[key] = min(best_by_pn.get(key, math.inf), seconds)
        if plan.pipeline_degree == 1 and plan.sm_for_comm == 0 and seconds < unpipelined:
            unpipelined, unpipelined_plan = seconds, plan
        if best is None or _better(seconds, plan, *best):
            best = (seconds, plan)
    assert best is not None
    return PlanChoice(best[1], best[0], unpipelined, best_by_pn, evaluated, time.perf_counter() - t0,
                      dict(costs.sources), unpipelined_plan)
