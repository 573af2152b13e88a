"""The timeline simulator: a hand-computed worked example, errors, outputs, and monotonicity in durations."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from epsjax.scheduler.simulator import Schedule, chrome_trace, gantt, simulate, write_trace


def worked_example() -> Schedule:
    """Two GPUs, a compute and a comm stream each.

        A  gpu0/compute  2.0                       0.0 -> 2.0
        B  gpu1/compute  3.0                       0.0 -> 3.0
        X  gpu0/comm + gpu1/comm  1.0  deps A, B   3.0 -> 4.0   (a collective waits for both GPUs)
        C  gpu0/compute  1.5  deps X               4.0 -> 5.5   (stream free at 2.0, X ends at 4.0)
        D  gpu0/compute  1.0                       5.5 -> 6.5   (FIFO behind C, no deps of its own)
        E  gpu1/comm     0.5                       4.0 -> 4.5   (its stream is busy with X until 4.0)
        F  gpu1/compute  0.25 deps E               4.5 -> 4.75  (gpu1/compute free since 3.0)
    makespan 6.5; gpu0/compute busy 4.5 of it.
    """
    s = Schedule("worked example", tokens=13)
    s.add("A", "attention", "gpu0/compute", 2.0)
    s.add("B", "attention", "gpu1/compute", 3.0)
    s.add("X", "dispatch", ["gpu0/comm", "gpu1/comm"], 1.0, ["A", "B"])
    s.add("C", "expert_gemm", "gpu0/compute", 1.5, ["X"])
    s.add("D", "unpermute", "gpu0/compute", 1.0)
    s.add("E", "combine", "gpu1/comm", 0.5)
    s.add("F", "unpermute", "gpu1/compute", 0.25, ["E"])
    return s


def test_worked_example():
    t = simulate(worked_example())
    expected = {"A": (0, 2), "B": (0, 3), "X": (3, 4), "C": (4, 5.5), "D": (5.5, 6.5), "E": (4, 4.5), "F": (4.5, 4.75)}
    assert {k: (t.start[k], t.end[k]) for k in expected} == expected
    assert t.makespan == 6.5
    assert t.throughput == 2.0  # 13 tokens / 6.5 s
    assert t.busy("gpu0/compute") == 4.5
    assert t.schedule.streams == ["gpu0/compute", "gpu0/comm", "gpu1/compute", "gpu1/comm"]
    assert t.by_kind()["attention"] == 5.0


def test_errors():
    s = Schedule("bad")
    s.add("A", "x", "s0", 1.0, ["B"])
    with pytest.raises(ValueError, match="not issued before"):
        simulate(s)
    s = Schedule("dup")
    s.add("A", "x", "s0", 1.0)
    s.add("A", "x", "s0", 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        simulate(s)
    with pytest.raises(ValueError, match="duration"):
        Schedule("neg").add("A", "x", "s0", -1.0)
    with pytest.raises(ValueError, match="no stream"):
        Schedule("none").add("A", "x", [], 1.0)


def test_outputs(tmp_path):
    t = simulate(worked_example())
    png = gantt(t, tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads(write_trace(t, tmp_path / "t.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 8  # X occupies two streams
    x = [e for e in events if e["name"] == "X"]
    assert {e["pid"] for e in x} == {0, 1} and all(e["ts"] == 3e6 and e["dur"] == 1e6 for e in x)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {"gpu0", "gpu1"}
    assert chrome_trace(t)["otherData"]["makespan_s"] == 6.5


@st.composite
def random_schedules(draw):
    """Random DAGs on 3 streams: each task may depend on any earlier one."""
    n = draw(st.integers(1, 12))
    s = Schedule("random")
    for i in range(n):
        streams = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True))
        deps = draw(st.lists(st.integers(0, max(i - 1, 0)), max_size=3)) if i else []
        s.add(f"t{i}", "k", streams, draw(st.floats(0, 10)), [f"t{d}" for d in set(deps)])
    return s, draw(st.integers(0, n - 1)), draw(st.floats(0, 1))


@settings(max_examples=60, deadline=None)
@given(random_schedules())
def test_shorter_task_never_delays(case):
    """Times are max-plus in the durations: shrinking one task never moves any end later."""
    s, i, factor = case
    before = simulate(s)
    shorter = Schedule("shorter", tasks=list(s.tasks))
    shorter.tasks[i] = shorter.tasks[i]._replace(duration=shorter.tasks[i].duration * factor)
    after = simulate(shorter)
    assert after.makespan <= before.makespan + 1e-12
    assert all(after.end[k] <= before.end[k] + 1e-12 for k in before.end)
