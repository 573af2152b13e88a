"""A DEP step in the scheduler's timeline simulator, and the same step time computed fast for the solver.

Streams (one representative device per group: devices of a group do the same work, the expert group at the pace
of its busiest device):

    AG/compute   embed, dense layers, attention, shared experts, combine, LM head      (attention devices)
    AG->EG/a2e   attention -> expert rows, per micro-batch or per segment               (link, one direction)
    EG/compute   grouped expert FFN per segment                                         (expert devices)
    EG->AG/e2a   expert -> attention rows                                               (link, other direction)

`build_schedule` turns a DEPSchedule's task list into an epsjax.scheduler Schedule (simulate / gantt /
write_trace take it from there). `step_time` computes the same makespan without building tasks: the step is a
max-plus system, one MoE layer maps the state (stream free times, each micro-batch's ready time) to the next,
and once two consecutive MoE layers shift the whole state by the same amount (or c layers, c <= 4) every later
layer does too, so the rest of the run of MoE layers is added in closed form. Exact, not an approximation:
tests/dep check it against the simulator.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from epsjax.dep.perf import MICRO_KINDS, LinearModels, MemoryModel
from epsjax.dep.schedule import DEPSchedule
from epsjax.scheduler.simulator import Schedule, Timeline, simulate

Seconds = Callable[[str, float], float]  # (task kind, tokens per attention device) -> seconds


@dataclasses.dataclass(frozen=True)
class DEPProblem:
    """FinDEP's optimisation problem for one model, deployment and prompt length.

    layer_kinds: "dense" / "moe" per layer. shared: MoE layers have shared experts. seq_len: S tokens per
    sequence. attention_devices: ag (each contributes r1 * ma * S tokens per step). models: linear task models.
    memory: the limits. Search space: r1 <= max_micro_batches, r2 <= max_segments, ma <= max_micro_batch_size,
    orders, and A2E whole or per segment (solver.shapes).
    """

    layer_kinds: tuple[str, ...]
    shared: bool
    seq_len: int
    attention_devices: int
    models: LinearModels
    memory: MemoryModel
    max_micro_batches: int = 8
    max_segments: int = 8
    max_micro_batch_size: int = 4096
    embed: bool = True
    head: bool = True

    @property
    def orders(self) -> tuple[str, ...]:
        return ("AASS", "ASAS") if self.shared else ("ASAS",)  # without shared experts both orders coincide

    def max_micro_batch(self, r1: int, r2: int) -> int:
        """The largest ma (sequences per attention device per micro-batch) within memory: 0 if none."""
        return min(self.max_micro_batch_size, int(self.memory.max_tokens(r1, r2) // self.seq_len))

    def tokens(self, plan: "Plan") -> float:
        return self.attention_devices * plan.schedule.micro_batches * plan.micro_batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class Plan:
    """A schedule with its micro-batch size ma (sequences per attention device per micro-batch)."""

    schedule: DEPSchedule
    micro_batch_size: int

    def describe(self) -> str:
        s = self.schedule
        a2e = " A2E/seg" if s.segment_a2e else ""
        return f"{s.name}: ma={self.micro_batch_size} r1={s.micro_batches} r2={s.segments} {s.order}{a2e}"

    def as_dict(self) -> dict:
        s = self.schedule
        return {"schedule": s.name, "ma": self.micro_batch_size, "r1": s.micro_batches, "r2": s.segments,
                "order": s.order, "segment_a2e": s.segment_a2e}


def durations(plan: Plan, seq_len: int, seconds: Seconds) -> dict[str, float]:
    """Each task kind's duration under the plan: micro-batch tasks at x = ma * S tokens, segment tasks at x / r2
    (experts, e2a, and a2e when segmented)."""
    x = plan.micro_batch_size * seq_len
    r2 = plan.schedule.segments
    out = {kind: seconds(kind, x) for kind in MICRO_KINDS}
    out.update(experts=seconds("experts", x / r2), e2a=seconds("e2a", x / r2),
               a2e=seconds("a2e", x / plan.schedule.a2e_tasks))
    return out


def task_tokens(plan: Plan, seq_len: int, kind: str) -> float:
    """Tokens per attention device one task of this kind carries."""
    s = plan.schedule
    x = plan.micro_batch_size * seq_len
    if kind in ("experts", "e2a"):
        return x / s.segments
    return x / s.a2e_tasks if kind == "a2e" else x


def build_schedule(problem: DEPProblem, plan: Plan, seconds: Seconds | None = None, *,
                   layer_kinds: tuple[str, ...] | None = None, embed: bool | None = None,
                   head: bool | None = None) -> Schedule:
    """The step as an epsjax.scheduler Schedule (durations from `seconds`, default the problem's linear models).
    layer_kinds / embed / head override the problem's (e.g. one MoE layer alone for a chart)."""
    seconds = seconds or problem.models.seconds
    kinds = problem.layer_kinds if layer_kinds is None else layer_kinds
    embed = problem.embed if embed is None else embed
    head = problem.head if head is None else head
    d = durations(plan, problem.seq_len, seconds)
    s = plan.schedule
    sched = Schedule(name=f"{plan.describe()}", tokens=problem.tokens(plan),
                     meta={**plan.as_dict(), "seq_len": problem.seq_len, "layers": len(kinds),
                           "attention_devices": problem.attention_devices})
    for t in s.tasks(kinds, shared=problem.shared, embed=embed, head=head):
        sched.add(t.name, t.kind, t.stream, d[t.kind], t.deps, layer=t.layer, micro=t.micro, segment=t.segment,
                  tokens=task_tokens(plan, problem.seq_len, t.kind))
    return sched


def simulate_plan(problem: DEPProblem, plan: Plan, seconds: Seconds | None = None, **kw) -> Timeline:
    return simulate(build_schedule(problem, plan, seconds, **kw))


# The fast path ------------------------------------------------------------------------------------------------------

def step_time(problem: DEPProblem, plan: Plan, seconds: Seconds | None = None) -> float:
    """The makespan simulate(build_schedule(problem, plan, seconds)) gives, in closed form over runs of MoE
    layers (module docstring). Mirrors DEPSchedule.tasks task by task."""
    d = durations(plan, problem.seq_len, seconds or problem.models.seconds)
    s = plan.schedule
    r1, r2, shared = s.micro_batches, s.segments, problem.shared
    aass, split = s.order == "AASS", s.segment_a2e
    dA, dX, dS, dG, dY, dC = d["attention"], d["a2e"], d["shared"], d["experts"], d["e2a"], d["combine"]
    # state: [AG free, A2E free, EG free, E2A free, ready of micro-batch 0 .. r1 - 1]
    st = [0.0] * (4 + r1)
    pending = [False] * r1

    def settle(m):
        if pending[m]:
            st[4 + m] = st[0] = max(st[0], st[4 + m]) + dC
            pending[m] = False

    def moe_layer():
        attn_end, shared_end = [0.0] * r1, [0.0] * r1
        for m in range(r1):
            settle(m)
            st[0] = eA = max(st[0], st[4 + m]) + dA
            sent = []  # end of the A2E task each segment waits for
            for _ in range(r2 if split else 1):
                st[1] = max(st[1], eA) + dX
                sent.append(st[1])
            if shared and not aass:
                st[0] = shared_end[m] = max(st[0], eA) + dS
            back = 0.0
            for j in range(r2):
                st[2] = eG = max(st[2], sent[j if split else 0]) + dG
                st[3] = back = max(st[3], eG) + dY
            st[4 + m], attn_end[m] = back, eA
        if shared and aass:
            for m in range(r1):
                st[0] = shared_end[m] = max(st[0], attn_end[m]) + dS
        for m in range(r1):
            if shared:
                st[4 + m] = max(st[4 + m], shared_end[m])
            pending[m] = True

    if problem.embed:
        for m in range(r1):
            st[4 + m] = st[0] = st[0] + d["embed"]
    kinds = problem.layer_kinds
    i = 0
    while i < len(kinds):
        if kinds[i] == "dense":
            for m in range(r1):
                settle(m)
                st[4 + m] = st[0] = max(st[0], st[4 + m]) + d["dense"]
            i += 1
            continue
        run = 1  # MoE layers in this run
        while i + run < len(kinds) and kinds[i + run] == "moe":
            run += 1
        moe_layer()
        history = [np.array(st)]  # states after MoE layers that followed an MoE layer (same map each time)
        done = 1
        while done < run:
            moe_layer()
            done += 1
            history.append(np.array(st))
            cycle = _cycle(history)
            if cycle:
                c, shift = cycle
                left = run - done
                for _ in range(left % c):
                    moe_layer()
                st[:] = list(np.array(st) + (left // c) * shift)
                done = run
        i += run
    for m in range(r1):
        settle(m)
        if problem.head:
            st[4 + m] = st[0] = max(st[0], st[4 + m]) + d["head"]
    return st[0]


def _cycle(history: list[np.ndarray], max_cycle: int = 4):
    """(c, shift) when the last state equals the state c layers before plus a uniform shift, else None."""
    last = history[-1]
    scale = max(1.0, float(np.max(np.abs(last))))
    for c in range(1, max_cycle + 1):
        if len(history) <= c:
            break
        delta = last - history[-1 - c]
        if float(delta.max() - delta.min()) <= 1e-12 * scale:
            return c, float(delta.mean())
    return None
