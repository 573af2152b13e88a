"""DEP task lists as worked examples, and their timelines in the scheduler's simulator."""

import pytest

from epsjax.dep import DEPSchedule
from epsjax.dep.perf import Linear, LinearModels, MemoryModel
from epsjax.dep.simulate import DEPProblem, Plan, simulate_plan, step_time

ONE_MOE = ("moe",)


def _names(schedule, kinds=ONE_MOE, shared=True, **kw):
    return [t.name for t in schedule.tasks(kinds, shared=shared, embed=False, head=False, **kw)]


def test_pppipe_task_order():
    """Micro-batch after micro-batch, the shared experts right after their attention (ASAS)."""
    assert _names(DEPSchedule.pppipe(2)) == [
        "attention[l0.m0]", "a2e[l0.m0]", "shared[l0.m0]", "experts[l0.m0.s0]", "e2a[l0.m0.s0]",
        "attention[l0.m1]", "a2e[l0.m1]", "shared[l0.m1]", "experts[l0.m1.s0]", "e2a[l0.m1.s0]",
        "combine[l0.m0]", "combine[l0.m1]"]


def test_findep_aass_task_order():
    """Every attention first, then every shared expert; each micro-batch's expert FFN and E2A in r2 segments."""
    assert _names(DEPSchedule.findep(2, 2, "AASS")) == [
        "attention[l0.m0]", "a2e[l0.m0]", "experts[l0.m0.s0]", "e2a[l0.m0.s0]", "experts[l0.m0.s1]",
        "e2a[l0.m0.s1]",
        "attention[l0.m1]", "a2e[l0.m1]", "experts[l0.m1.s0]", "e2a[l0.m1.s0]", "experts[l0.m1.s1]",
        "e2a[l0.m1.s1]",
        "shared[l0.m0]", "shared[l0.m1]", "combine[l0.m0]", "combine[l0.m1]"]


def test_segmented_a2e_task_order():
    """segment_a2e: one A2E per segment, each carrying segment j's rows; experts(j) waits for a2e(j) alone."""
    schedule = DEPSchedule.findep(2, 2, "ASAS", segment_a2e=True)
    assert _names(schedule) == [
        "attention[l0.m0]", "a2e[l0.m0.s0]", "a2e[l0.m0.s1]", "shared[l0.m0]", "experts[l0.m0.s0]",
        "e2a[l0.m0.s0]", "experts[l0.m0.s1]", "e2a[l0.m0.s1]",
        "attention[l0.m1]", "a2e[l0.m1.s0]", "a2e[l0.m1.s1]", "shared[l0.m1]", "experts[l0.m1.s0]",
        "e2a[l0.m1.s0]", "experts[l0.m1.s1]", "e2a[l0.m1.s1]",
        "combine[l0.m0]", "combine[l0.m1]"]
    by_name = {t.name: t for t in schedule.tasks(ONE_MOE, shared=True, embed=False, head=False)}
    assert by_name["experts[l0.m1.s1]"].deps == ("a2e[l0.m1.s1]",)
    assert by_name["a2e[l0.m1.s1]"].deps == ("attention[l0.m1]",)
    assert (by_name["a2e[l0.m0.s1]"].segment, by_name["a2e[l0.m0.s1]"].stream) == (1, "AG->EG/a2e")
    # Unsegmented, every segment's FFN waits for the micro-batch's one A2E.
    whole = {t.name: t for t in DEPSchedule.findep(2, 2, "ASAS").tasks(ONE_MOE, shared=True, embed=False,
                                                                        head=False)}
    assert whole["experts[l0.m1.s1]"].deps == ("a2e[l0.m1]",)
    assert DEPSchedule.findep(2, 3, "AASS", True).a2e_tasks == 3 and DEPSchedule.findep(2, 3, "AASS").a2e_tasks == 1


def test_layers_chain_through_combine_and_dependencies_come_first():
    schedule = DEPSchedule.findep(3, 2, "ASAS")
    tasks = schedule.tasks(("dense", "moe", "moe", "dense", "moe"), shared=True)
    seen = set()
    for t in tasks:
        assert set(t.deps) <= seen, t
        seen.add(t.name)
    by_name = {t.name: t for t in tasks}
    # Layer 2's attention of micro-batch 1 waits for layer 1's combine of micro-batch 1, which waits for both
    # segments' E2A and the shared experts.
    assert by_name["attention[l2.m1]"].deps == ("combine[l1.m1]",)
    assert set(by_name["combine[l1.m1]"].deps) == {"e2a[l1.m1.s0]", "e2a[l1.m1.s1]", "shared[l1.m1]"}
    assert by_name["dense[l3.m0]"].deps == ("combine[l2.m0]",)
    assert by_name["head[m2]"].deps == ("combine[l4.m2]",)
    assert [t.kind for t in tasks].count("combine") == 3 * 3


def test_no_shared_tasks_without_shared_experts():
    names = _names(DEPSchedule.findep(2, 2, "AASS"), shared=False)
    assert not [n for n in names if n.startswith("shared")]
    assert _names(DEPSchedule.findep(2, 2, "AASS"), shared=False) == _names(DEPSchedule.findep(2, 2, "ASAS"),
                                                                             shared=False)


def test_schedule_validation():
    with pytest.raises(ValueError, match="micro_batches"):
        DEPSchedule(0, 1)
    with pytest.raises(ValueError, match="order"):
        DEPSchedule(1, 1, "SAAS")
    with pytest.raises(ValueError, match="segment_a2e"):
        DEPSchedule(1, 2, "ASAS", "findep", 1)
    with pytest.raises(ValueError, match="layer kinds"):
        DEPSchedule.naive().tasks(("moe", "attention"), shared=False)


# Worked timelines ---------------------------------------------------------------------------------------------

UNIT = {"attention": 1.0, "a2e": 2.0, "experts": 3.0, "e2a": 4.0, "shared": 5.0, "combine": 1.0, "embed": 0.0,
        "dense": 0.0, "head": 0.0}


def _problem(durations, kinds=ONE_MOE, shared=True, **kw):
    models = LinearModels(tuple((k, Linear(v, 0.0)) for k, v in durations.items()))
    memory = MemoryModel(0, 1, 0, 0, 1, 0, 1e12, 1e12)
    return DEPProblem(kinds, shared, 1, 1, models, memory, embed=False, head=False, **kw)


@pytest.mark.parametrize("schedule,makespan", [
    # A [0,1], A2E [1,3], S [1,6], G [3,6], E2A [6,10], combine [10,11]
    (DEPSchedule.naive(), 11.0),
    # A0 [0,1] S0 [1,6] A1 [6,7] S1 [7,12]; G0 [3,6] E2A0 [6,10]; A2E1 [7,9] G1 [9,12] E2A1 [12,16];
    # combine0 [12,13] (after S1 on the attention stream), combine1 [16,17]
    (DEPSchedule.pppipe(2), 17.0),
    # A0 [0,1] A1 [1,2] S0 [2,7] S1 [7,12]; A2E [1,3] [3,5]; G [3,6] [6,9]; E2A [6,10] [10,14];
    # combine0 [12,13], combine1 [14,15]: attention first lets the expert group start on micro-batch 1 earlier
    (DEPSchedule.findep(2, 1, "AASS"), 15.0),
])
def test_worked_timelines(schedule, makespan):
    problem = _problem(UNIT)
    plan = Plan(schedule, 1)
    assert simulate_plan(problem, plan).makespan == pytest.approx(makespan)
    assert step_time(problem, plan) == pytest.approx(makespan)


def test_segments_overlap_expert_ffn_with_e2a():
    """r2 = 2 halves the expert FFN and E2A tasks (beta only): segment 0's E2A runs beside segment 1's FFN."""
    durations = {k: 0.0 for k in UNIT}
    models = LinearModels(tuple((k, Linear(0.0, {"experts": 4.0, "e2a": 4.0}.get(k, 0.0))) for k in UNIT))
    problem = DEPProblem(ONE_MOE, False, 1, 1, models, _problem(durations).memory, embed=False, head=False)
    assert step_time(problem, Plan(DEPSchedule.findep(1, 1, "ASAS"), 1)) == pytest.approx(8.0)
    assert step_time(problem, Plan(DEPSchedule.findep(1, 2, "ASAS"), 1)) == pytest.approx(6.0)   # 2 + 2 + 2
    assert step_time(problem, Plan(DEPSchedule.findep(1, 4, "ASAS"), 1)) == pytest.approx(5.0)   # 1 + 4 * 1


def test_segmented_a2e_starts_the_expert_ffn_early():
    """A2E, expert FFN and E2A cost 4 each per micro-batch (beta only). Whole A2E with r2 = 2: A2E [0,4], then
    FFN [4,6] [6,8], E2A [6,8] [8,10] -> 10. Segmented: A2E [0,2] [2,4], FFN [2,4] [4,6], E2A [4,6] [6,8] -> 8.
    With a latency alpha = 1 per A2E task the link pays it twice: A2E [0,3] [3,6], FFN [3,5] [6,8], E2A [5,7]
    [8,10] -> 10, against 11 whole (A2E [0,5], FFN [5,7] [7,9], E2A [7,9] [9,11])."""
    def problem(alpha):
        models = LinearModels(tuple((k, Linear(alpha if k == "a2e" else 0.0,
                                               4.0 if k in ("a2e", "experts", "e2a") else 0.0)) for k in UNIT))
        return DEPProblem(ONE_MOE, False, 1, 1, models, _problem(UNIT).memory, embed=False, head=False)

    for alpha, whole, split in ((0.0, 10.0, 8.0), (1.0, 11.0, 10.0)):
        for segmented, makespan in ((False, whole), (True, split)):
            plan = Plan(DEPSchedule.findep(1, 2, "ASAS", segmented), 1)
            assert simulate_plan(problem(alpha), plan).makespan == pytest.approx(makespan)
            assert step_time(problem(alpha), plan) == pytest.approx(makespan)
