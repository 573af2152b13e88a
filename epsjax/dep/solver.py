"""FinDEP's solver: the plan (ma, r1, r2, order) of highest throughput under the memory limits, and the
exhaustive search it is checked against.

The problem (epsjax/dep/simulate.py DEPProblem): maximise  tokens(plan) / makespan(plan)  over
ma in ceil(r2 / S)..ma_max(r1, r2) (no empty token segment; memory), r1 in 1..R1, r2 in 1..R2, order in
{AASS, ASAS}, and A2E whole or segmented (segment_a2e, for r2 >= 2: with r2 = 1 both are the same schedule);
makespan is the simulated step with task durations alpha + beta * x from the linear models. Segmented A2E lets
segment 0's expert FFN start before the whole micro-batch's rows have arrived but pays the link's latency alpha
once per segment, so the solver searches both and picks by step time: FinDEP's space holds the unsegmented
schedules it had before.

Two facts make it small:

1. For a fixed shape (r1, r2, order, segment_a2e) the best ma is the largest that fits. Every task's duration is
   alpha + beta * x with alpha, beta >= 0 and x proportional to ma; the makespan is a maximum over paths of the
   task graph of sums of durations, so makespan(ma) = max_p (A_p + B_p * ma) with A_p, B_p >= 0, and
   tokens / makespan = c / max_p (A_p / ma + B_p) is non-decreasing in ma. The memory use grows with ma, so
   ma* = ma_max(r1, r2).
2. Each remaining candidate has a cheap upper bound on its throughput: the makespan is at least the busy time of
   any one stream plus the shortest lead-in and tail around it, and at least one micro-batch's chain through
   every layer. Candidates are evaluated best bound first with the exact fast step time (simulate.step_time) and
   the search stops when no remaining bound beats the best plan found.

`exhaustive` enumerates every (ma, r1, r2, order), simulating each with epsjax.scheduler's simulator.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from epsjax.dep.schedule import DEPSchedule
from epsjax.dep.simulate import DEPProblem, Plan, durations, simulate_plan, step_time
from epsjax.scheduler.errors import ScheduleError

SPACES = ("naive", "pppipe", "findep")


@dataclasses.dataclass(frozen=True)
class Solution:
    plan: Plan | None            # None: nothing fits in memory
    throughput: float            # tokens / s (linear models)
    makespan: float              # seconds of one step
    candidates: int              # (r1, r2, order, segment_a2e) shapes in the space (exhaustive: plans)
    evaluated: int               # step times computed
    seconds: float               # solver wall time

    def as_dict(self) -> dict:
        return {"plan": None if self.plan is None else self.plan.as_dict(), "tokens_per_s": self.throughput,
                "step_s": self.makespan, "candidates": self.candidates, "evaluated": self.evaluated,
                "solve_ms": self.seconds * 1e3}


def shapes(problem: DEPProblem, space: str = "findep") -> list[DEPSchedule]:
    """The (r1, r2, order, segment_a2e) schedules of a space: naive (1, 1), pppipe (r1, 1, ASAS), findep
    (everything; segmented A2E only for r2 >= 2)."""
    if space == "naive":
        return [DEPSchedule.naive()]
    if space == "pppipe":
        return [DEPSchedule.pppipe(r1) for r1 in range(1, problem.max_micro_batches + 1)]
    if space == "findep":
        return [DEPSchedule.findep(r1, r2, order, split)
                for r1, r2, order, split in itertools.product(range(1, problem.max_micro_batches + 1),
                                                              range(1, problem.max_segments + 1), problem.orders,
                                                              (False, True))
                if r2 > 1 or not split]
    raise ScheduleError(f"space must be one of {SPACES}, got {space!r}")


def min_micro_batch(problem: DEPProblem, schedule: DEPSchedule) -> int:
    """The smallest ma that gives every token segment a token (ma * S >= r2; decode has S = 1)."""
    return max(1, -(-schedule.segments // problem.seq_len))


def lower_bound(problem: DEPProblem, plan: Plan) -> float:
    """A makespan no simulation of the plan can beat (module docstring, fact 2)."""
    d = durations(plan, problem.seq_len, problem.models.seconds)
    s = plan.schedule
    r1, r2 = s.micro_batches, s.segments
    kinds = problem.layer_kinds
    moe, dense = kinds.count("moe"), kinds.count("dense")
    first_moe = kinds.index("moe") if moe else len(kinds)
    dS = d["shared"] if problem.shared else 0.0
    lead = (d["embed"] if problem.embed else 0.0) + first_moe * d["dense"]
    tail = d["head"] if problem.head else 0.0
    ag_busy = r1 * ((d["embed"] if problem.embed else 0.0) + dense * d["dense"] + moe * (d["attention"] + dS
                    + d["combine"]) + tail)
    if not moe:
        return ag_busy
    # One micro-batch's routed rows through a layer: a flow shop of identical segments over the links and the
    # expert group, whose makespan is the sum of one segment's stages plus (r2 - 1) times the longest stage
    # (A2E counts once when it is not segmented).
    stages = (d["a2e"], d["experts"], d["e2a"]) if s.segment_a2e else (d["experts"], d["e2a"])
    routed = (0.0 if s.segment_a2e else d["a2e"]) + sum(stages) + (r2 - 1) * max(stages)
    chain = (lead + dense * d["dense"] - first_moe * d["dense"] + tail
             + moe * (d["attention"] + d["combine"] + max(dS, routed)))
    a2e = lead + d["attention"] + moe * r1 * s.a2e_tasks * d["a2e"] + d["experts"] + d["e2a"] + d["combine"] + tail
    eg = lead + d["attention"] + d["a2e"] + moe * r1 * r2 * d["experts"] + d["e2a"] + d["combine"] + tail
    e2a = lead + d["attention"] + d["a2e"] + d["experts"] + moe * r1 * r2 * d["e2a"] + d["combine"] + tail
    return max(ag_busy, chain, a2e, eg, e2a)


def solve(problem: DEPProblem, space: str = "findep") -> Solution:
    """The best plan of a space (naive / pppipe / findep) under the problem's linear models and memory."""
    start = time.perf_counter()
    candidates = []
    for schedule in shapes(problem, space):
        ma = problem.max_micro_batch(schedule.micro_batches, schedule.segments)
        if ma >= min_micro_batch(problem, schedule):
            plan = Plan(schedule, ma)
            candidates.append((problem.tokens(plan) / max(lower_bound(problem, plan), 1e-30), plan))
    candidates.sort(key=lambda c: -c[0])
    best, best_tp, best_span, evaluated = None, 0.0, float("inf"), 0
    for bound, plan in candidates:
        if bound <= best_tp * (1 + 1e-12):
            break
        span = step_time(problem, plan)
        evaluated += 1
        tp = problem.tokens(plan) / max(span, 1e-30)
        if tp > best_tp:
            best, best_tp, best_span = plan, tp, span
    return Solution(best, best_tp, best_span, len(shapes(problem, space)), evaluated, time.perf_counter() - start)


def exhaustive(problem: DEPProblem, space: str = "findep") -> Solution:
    """Every (ma, r1, r2, order) of the space within memory, each simulated with the scheduler's simulator."""
    start = time.perf_counter()
    best, best_tp, best_span, count = None, 0.0, float("inf"), 0
    for schedule in shapes(problem, space):
        for ma in range(min_micro_batch(problem, schedule),
                        problem.max_micro_batch(schedule.micro_batches, schedule.segments) + 1):
            plan = Plan(schedule, ma)
            span = simulate_plan(problem, plan).makespan
            count += 1
            tp = problem.tokens(plan) / max(span, 1e-30)
            if tp > best_tp:
                best, best_tp, best_span = plan, tp, span
    return Solution(best, best_tp, best_span, count, count, time.perf_counter() - start)
