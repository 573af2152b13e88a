"""DEP workloads: a fixed batch split as the runtime splits it, the largest batch within a TTFT budget (checked
against a scan of every batch), and MegaScale-Infer's ping-pong rule as worked examples."""

import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from epsjax.dep import DEPSchedule
from epsjax.dep.perf import Linear, LinearModels, MemoryModel
from epsjax.dep.simulate import DEPProblem, Plan, simulate_plan
from epsjax.dep.workloads import (admissible, for_batch, micro_batch_size, pingpong_rule, pingpong_within_budget,
                                  rule_terms, within_budget)
from tests.dep.test_solver import KINDS, problems


def test_micro_batches_pad_like_the_runtime():
    """b = 3 sequences in r1 = 2 micro-batches: ceil(3 / 2) = 2 each, one padded. b = 4 in r1 = 3: ma = 2 would
    leave the third micro-batch all padding, so the shape is out."""
    assert micro_batch_size(3, 2) == 2 and micro_batch_size(4, 3) == 0 and micro_batch_size(5, 5) == 1
    problem = _unit_problem({"attention": 1.0})
    assert not admissible(problem, Plan(DEPSchedule.findep(1, 2, "ASAS"), 1))  # one token, two segments
    solution = for_batch(problem, 3, "pppipe")
    # Only the real tokens count: 3 sequences of one token on one attention device.
    assert solution.tokens == 3 and solution.throughput == pytest.approx(3 / solution.makespan)


def _unit_problem(alphas, **kw):
    models = LinearModels(tuple((k, Linear(alphas.get(k, 0.0), 0.0)) for k in KINDS))
    return DEPProblem(("moe",), True, 1, 1, models, MemoryModel(0, 1, 0, 0, 1, 0, 1e9, 1e9), embed=False,
                      head=False, **kw)


@pytest.mark.parametrize("t_c,sequences,m", [
    (0.5, 6, 3),   # T_f = 1, T_c = 0.5: m >= 2 * 1.5 = 3
    (0.0, 6, 2),   # no communication: two micro-batches ping-pong
    (1.0, 8, 4),   # m >= 4 (with 6 sequences m = 4 or 5 would leave a micro-batch all padding: 6)
    (0.5, 2, 2),   # the rule wants 3, the batch allows 2
])
def test_pingpong_rule_worked_examples(t_c, sequences, m):
    """Every task costs alpha only: attention 0.6 + shared 0.2 + combine 0.2 = T_a = 1 = T_e, A2E = E2A = T_c."""
    problem = _unit_problem({"attention": 0.6, "shared": 0.2, "combine": 0.2, "experts": 1.0, "a2e": t_c,
                             "e2a": t_c})
    solution = pingpong_rule(problem, sequences=sequences)
    assert solution.plan.schedule == DEPSchedule.pppipe(m)
    assert solution.plan.micro_batch_size == math.ceil(sequences / m)
    assert rule_terms(problem, solution.plan)["m_min"] == pytest.approx(2 * (1 + t_c))
    assert solution.makespan == pytest.approx(simulate_plan(problem, solution.plan).makespan)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_layers=4, max_r=3, max_ma=6), st.sampled_from(("pppipe", "findep")), st.floats(0.8, 6.0))
def test_within_budget_equals_a_scan_of_every_batch(problem, space, scale):
    """The largest b whose best plan's step fits, found per shape by bisection, equals trying every b."""
    largest = 3 * problem.max_micro_batch_size
    first = for_batch(problem, 1, space)
    budget = scale * first.makespan if first.plan is not None else 1.0
    want = max((b for b in range(1, largest + 1) if for_batch(problem, b, space).makespan <= budget), default=0)
    got = within_budget(problem, budget, space, max_sequences=largest)
    assert got.sequences == want
    if want:
        assert got.makespan <= budget and got.makespan == pytest.approx(for_batch(problem, want, space).makespan)
        assert simulate_plan(problem, got.plan).makespan == pytest.approx(got.makespan)
        rule = pingpong_within_budget(problem, budget, upper=want)
        assert rule.sequences <= want and (rule.plan is None or rule.makespan <= budget)
