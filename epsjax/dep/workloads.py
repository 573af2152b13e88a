"""DEP plans for the workloads users run, beside solver.py's "largest batch memory allows": a fixed batch, a
TTFT-bound prefill and decode steps; and MegaScale-Infer's ping-pong rule for PPPipe's micro-batch count.

    problem = problem_for(cfg, deployment, seq_len=1024)               # decode: seq_len=1, context=4096
    for_batch(problem, 2, "findep", costs.seconds)                      # 2 sequences per attention device
    within_budget(problem, 1.0, "pppipe", costs.seconds)                # the largest batch whose step <= 1 s
    pingpong_rule(problem, costs.seconds, sequences=2)                  # MegaScale-Infer's m, as a PPPipe plan

A batch is `sequences` per attention device (attention is data parallel: every attention device holds as many),
ag * sequences in all. A plan splits it as DEPRuntime.prefill does: r1 micro-batches of ma = ceil(b / r1)
sequences per attention device, the last ones padded; shapes that would leave a micro-batch all padding, or a
token segment empty (r2 > ma * S), are left out, and so are plans that do not fit in memory. Decode is the same
problem with seq_len 1 and the KV cache of `context` tokens (TaskCosts: attention reads it, so it is
memory-bound; the expert group batches the rows of every attention device).

The search is exhaustive over the space's shapes (solver.shapes) with the exact fast step time, so `seconds` can
be the cost models themselves (TaskCosts.seconds), not only the solver's linear fits.

Ping-pong rule (MegaScale-Infer, arXiv:2504.02263, section 4, "ping-pong pipeline parallelism"): with attention
time T_a and expert time T_e per micro-batch balanced by the split of devices, T_f = max(T_a, T_e), and T_c the
time of one direction's transfer, the attention side never idles when m micro-batches cover a round trip:
m * T_f >= 2 * (T_f + T_c), i.e.  m >= 2 * (1 + T_c / T_f).  We take the smallest m that meets it, with T_a =
attention + shared + combine, T_e = the expert FFN, T_c = max(A2E, E2A) of one micro-batch at that m (the split
is the deployment's, not chosen by the rule). When no m <= the batch (and R1) meets it, the largest m that does
not leave a micro-batch empty. The plan is PPPipe's (r2 = 1, shared experts with their attention).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from epsjax.dep.schedule import DEPSchedule
from epsjax.dep.simulate import DEPProblem, Plan, Seconds, durations, step_time
from epsjax.dep.solver import min_micro_batch, shapes


Space = str | Sequence[DEPSchedule]  # a solver space ("naive" / "pppipe" / "findep") or the schedules themselves


def _schedules(problem: DEPProblem, space: Space) -> list[DEPSchedule]:
    return shapes(problem, space) if isinstance(space, str) else list(space)


def micro_batch_size(sequences: int, r1: int) -> int:
    """ma of a batch of `sequences` per attention device in r1 micro-batches (0 if one would be all padding)."""
    ma = math.ceil(sequences / r1)
    return ma if (r1 - 1) * ma < sequences else 0


def admissible(problem: DEPProblem, plan: Plan) -> bool:
    """Fits in memory, and every token segment holds at least one token."""
    s, x = plan.schedule, plan.micro_batch_size * problem.seq_len
    return (plan.micro_batch_size >= 1 and s.segments <= x
            and problem.memory.fits(x, s.micro_batches, s.segments))


@dataclasses.dataclass(frozen=True)
class BatchSolution:
    """The best plan for a batch: its step time and throughput (the batch's real tokens, not the padding)."""

    plan: Plan | None            # None: nothing admissible
    sequences: int               # per attention device
    tokens: float                # all attention devices' real tokens in the step
    makespan: float              # seconds
    evaluated: int
    seconds: float               # search wall time

    @property
    def throughput(self) -> float:
        return self.tokens / self.makespan if self.plan is not None else 0.0

    def as_dict(self) -> dict:
        return {"plan": None if self.plan is None else self.plan.as_dict(), "sequences": self.sequences,
                "tokens": self.tokens, "step_s": self.makespan if self.plan is not None else None,
                "tokens_per_s": self.throughput, "evaluated": self.evaluated, "search_ms": self.seconds * 1e3}


def _solution(problem, plan, sequences, span, evaluated, start) -> BatchSolution:
    tokens = problem.attention_devices * sequences * problem.seq_len
    return BatchSolution(plan, sequences, tokens, span, evaluated, time.perf_counter() - start)


def for_batch(problem: DEPProblem, sequences: int, space: Space = "findep", seconds: Seconds | None = None
              ) -> BatchSolution:
    """The plan of the space with the shortest step for `sequences` per attention device (exhaustive)."""
    start = time.perf_counter()
    best, best_span, evaluated = None, math.inf, 0
    for schedule in _schedules(problem, space):
        plan = Plan(schedule, micro_batch_size(sequences, schedule.micro_batches))
        if not admissible(problem, plan):
            continue
        span = step_time(problem, plan, seconds)
        evaluated += 1
        if span < best_span * (1 - 1e-12):
            best, best_span = plan, span
    return _solution(problem, best, sequences, best_span, evaluated, start)


def within_budget(problem: DEPProblem, budget_s: float, space: Space = "findep", seconds: Seconds | None = None,
                  max_sequences: int = 1 << 14) -> BatchSolution:
    """The largest batch (sequences per attention device) whose step fits in budget_s (a TTFT bound for prefill:
    the last sequence's first token comes out at the end of the step), and its fastest plan.

    The largest such batch is a multiple r1 * ma of some shape's micro-batch (padding a batch up to that costs
    nothing more), so for each shape the largest ma within the budget is found by bisection: a shape's step time
    never falls as ma grows (durations nondecreasing in tokens; the step is a max-plus expression of them).
    """
    start = time.perf_counter()
    best, best_b, best_span, evaluated = None, 0, math.inf, 0
    for schedule in _schedules(problem, space):
        r1 = schedule.micro_batches

        def fits(ma):
            nonlocal evaluated
            plan = Plan(schedule, ma)
            if not admissible(problem, plan):
                return None
            evaluated += 1
            span = step_time(problem, plan, seconds)
            return span if span <= budget_s else None

        hi_cap = max_sequences // r1
        lo = min_micro_batch(problem, schedule)
        if r1 * hi_cap < best_b or lo > hi_cap or fits(lo) is None:
            continue
        hi = 2 * lo  # fits(lo); grow hi until it does not fit
        while hi <= hi_cap and fits(hi) is not None:
            lo, hi = hi, hi * 2
        hi = min(hi, hi_cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid)
        span = fits(lo)
        if r1 * lo > best_b or (r1 * lo == best_b and span < best_span):
            best, best_b, best_span = Plan(schedule, lo), r1 * lo, span
    return _solution(problem, best, best_b, best_span, evaluated, start)


def rule_terms(problem: DEPProblem, plan: Plan, seconds: Seconds | None = None) -> dict[str, float]:
    """T_a, T_e, T_c, T_f of one micro-batch and the rule's bound 2 * (1 + T_c / T_f) (module docstring)."""
    d = durations(plan, problem.seq_len, seconds or problem.models.seconds)
    t_a = d["attention"] + (d["shared"] if problem.shared else 0.0) + d["combine"]
    t_e, t_c = d["experts"], max(d["a2e"], d["e2a"])
    t_f = max(t_a, t_e)
    return {"T_a": t_a, "T_e": t_e, "T_c": t_c, "T_f": t_f, "m_min": 2 * (1 + t_c / t_f) if t_f > 0 else math.inf}


def pingpong_rule(problem: DEPProblem, seconds: Seconds | None = None, sequences: int | None = None
                  ) -> BatchSolution:
    """PPPipe with MegaScale-Infer's micro-batch count (module docstring) for `sequences` per attention device,
    or (None) each m's largest micro-batch within memory."""
    start = time.perf_counter()
    fallback, evaluated = None, 0
    for m in range(1, problem.max_micro_batches + 1):
        if sequences is None:
            ma = problem.max_micro_batch(m, 1)
        else:
            ma = micro_batch_size(sequences, m) if m <= sequences else 0
        plan = Plan(DEPSchedule.pppipe(m), ma)
        if not admissible(problem, plan):
            continue
        fallback = plan
        evaluated += 1
        if m >= rule_terms(problem, plan, seconds)["m_min"] * (1 - 1e-12):
            break
    if fallback is None:
        return _solution(problem, None, sequences or 0, math.inf, evaluated, start)
    b = sequences if sequences is not None else fallback.schedule.micro_batches * fallback.micro_batch_size
    return _solution(problem, fallback, b, step_time(problem, fallback, seconds), evaluated, start)


def pingpong_within_budget(problem: DEPProblem, budget_s: float, seconds: Seconds | None = None,
                           upper: int | None = None) -> BatchSolution:
    """The largest batch whose ping-pong-rule plan fits in budget_s. The rule's plan is one of PPPipe's, so no
    batch larger than tuned PPPipe's within the budget (`upper`) can fit: batches are tried downward from it."""
    start = time.perf_counter()
    if upper is None:
        upper = within_budget(problem, budget_s, "pppipe", seconds).sequences
    for b in range(upper, 0, -1):
        sol = pingpong_rule(problem, seconds, b)
        if sol.plan is not None and sol.makespan <= budget_s:
            return dataclasses.replace(sol, seconds=time.perf_counter() - start)
    return _solution(problem, None, 0, math.inf, 0, start)
