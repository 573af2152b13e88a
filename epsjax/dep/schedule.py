"""DEP schedules: which tasks run on which group, in which order. One task list drives both the runtime and
the simulator.

A DEP step pushes r1 micro-batches (ma sequences on each attention device) through every layer. An MoE layer
of micro-batch m is

    attention group:  attention(l, m) -> shared(l, m)                   + combine(l, m) once the rows are back
    A2E link:         a2e(l, m)                                          the routed rows of micro-batch m, or
                      a2e(l, m, j) for each j < r2 (segment_a2e)         segment j's routed rows only
    expert group:     experts(l, m, j) for each token segment j < r2     grouped expert FFN on segment j's rows
    E2A link:         e2a(l, m, j)                                        segment j's rows back, as they are done

experts(l, m, j) waits for a2e(l, m) (the whole micro-batch's rows), or with segment_a2e for a2e(l, m, j) alone,
so segment 0's FFN starts while segment 1's rows are still on the link. combine(l, m) (routed + shared output,
residual) feeds attention(l + 1, m). The three schedules differ in r1, r2, segment_a2e and in where shared(l, m)
sits on the attention group's stream:

    naive    r1 = 1, r2 = 1: one micro-batch, nothing pipelined
    pppipe   r1 micro-batches ping-pong between the groups (MegaScale-Infer); r2 = 1; shared right after its
             attention (ASAS: the shared experts are part of the attention module, as PPPipe has no notion of them)
    findep   r1 x r2, the order of the shared experts on the attention group:
             AASS = attention(l, 0..r1-1) then shared(l, 0..r1-1);  ASAS = attention(l, m), shared(l, m), ...
             and whether A2E is segmented like the expert FFN and E2A (segment_a2e). Segmenting costs one link
             latency per segment, so neither choice always wins: the solver searches both (solver.shapes).

Issue order within a micro-batch's MoE layer: attention, its a2e task(s) (segment order), shared (ASAS), then
experts / e2a per segment.

`tasks` gives the issue order: each stream runs its tasks in this order (like a CUDA stream), a task waits for
its dependencies, and every dependency is issued before the task that needs it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

from epsjax.scheduler.errors import ScheduleError

ORDERS = ("AASS", "ASAS")
KINDS = ("embed", "dense", "attention", "shared", "a2e", "experts", "e2a", "combine", "head")

# Which group (and which of its lanes) runs each kind. The links are full duplex: A2E and E2A have one lane each.
STREAM_OF = {"embed": "AG/compute", "dense": "AG/compute", "attention": "AG/compute", "shared": "AG/compute",
             "combine": "AG/compute", "head": "AG/compute", "a2e": "AG->EG/a2e", "experts": "EG/compute",
             "e2a": "EG->AG/e2a"}


class TaskRef(NamedTuple):
    """One task of a DEP step. layer / micro / segment are -1 where they do not apply."""

    kind: str
    layer: int
    micro: int
    segment: int
    deps: tuple[str, ...]

    @property
    def name(self) -> str:
        return task_name(self.kind, self.layer, self.micro, self.segment)

    @property
    def stream(self) -> str:
        return STREAM_OF[self.kind]


def task_name(kind: str, layer: int = -1, micro: int = -1, segment: int = -1) -> str:
    parts = [f"l{layer}" if layer >= 0 else "", f"m{micro}" if micro >= 0 else "",
             f"s{segment}" if segment >= 0 else ""]
    return f"{kind}[{'.'.join(p for p in parts if p)}]"


@dataclasses.dataclass(frozen=True)
class DEPSchedule:
    """micro_batches: r1. segments: r2 token segments per micro-batch on the expert group. order: AASS | ASAS.
    name: "naive" | "pppipe" | "findep" (what made it; the fields alone define the schedule).
    segment_a2e: one A2E task per segment (a2e(l, m, j), segment j's rows) instead of one per micro-batch.
    Default False (one A2E per micro-batch, as PPPipe and the naive schedule have it)."""

    micro_batches: int = 1
    segments: int = 1
    order: Literal["AASS", "ASAS"] = "ASAS"
    name: str = "findep"
    segment_a2e: bool = False

    def __post_init__(self):
        for field in ("micro_batches", "segments"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ScheduleError(f"DEPSchedule.{field} must be a positive int, got {value!r}")
        if self.order not in ORDERS:
            raise ScheduleError(f"DEPSchedule.order must be one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.segment_a2e, bool):
            raise ScheduleError(f"DEPSchedule.segment_a2e must be a bool, got {self.segment_a2e!r}")

    @property
    def a2e_tasks(self) -> int:
        """A2E tasks per micro-batch and MoE layer: r2 with segment_a2e, else 1."""
        return self.segments if self.segment_a2e else 1

    @classmethod
    def naive(cls) -> "DEPSchedule":
        return cls(1, 1, "ASAS", "naive")

    @classmethod
    def pppipe(cls, micro_batches: int) -> "DEPSchedule":
        return cls(micro_batches, 1, "ASAS", "pppipe")

    @classmethod
    def findep(cls, micro_batches: int, segments: int, order: str, segment_a2e: bool = False) -> "DEPSchedule":
        return cls(micro_batches, segments, order, "findep", segment_a2e)

    def describe(self) -> str:
        a2e = ", A2E segmented" if self.segment_a2e else ""
        return f"{self.name}(r1={self.micro_batches}, r2={self.segments}, {self.order}{a2e})"

    def tasks(self, layer_kinds: tuple[str, ...], *, shared: bool, embed: bool = True,
              head: bool = True) -> list[TaskRef]:
        """The step's tasks in issue order.

        layer_kinds: "dense" or "moe" per layer (ModelConfig.is_moe_layer). shared: whether MoE layers have
        shared experts (no shared tasks otherwise). embed / head: the embedding before the first layer and the
        LM head after the last (the simulator leaves them out to chart a single layer).
        """
        r1, r2 = self.micro_batches, self.segments
        out: list[TaskRef] = []
        last = [()] * r1          # per micro-batch: the task(s) its next layer waits for
        pending = [False] * r1    # an MoE layer's combine not issued yet

        def add(kind, layer=-1, micro=-1, segment=-1, deps=()):
            ref = TaskRef(kind, layer, micro, segment, tuple(deps))
            out.append(ref)
            return ref.name

        def settle(m):
            """combine of micro-batch m's previous MoE layer (routed rows back + shared), if one is pending."""
            if pending[m]:
                layer = out_layer[m]
                last[m] = (add("combine", layer, m, deps=last[m]),)
                pending[m] = False

        out_layer = [-1] * r1
        if embed:
            for m in range(r1):
                last[m] = (add("embed", micro=m),)
        for layer, kind in enumerate(layer_kinds):
            if kind == "dense":
                for m in range(r1):
                    settle(m)
                    last[m] = (add("dense", layer, m, deps=last[m]),)
                continue
            if kind != "moe":
                raise ScheduleError(f"layer kinds must be 'dense' or 'moe', got {kind!r}")
            shared_names = [None] * r1
            for m in range(r1):
                settle(m)
                attention = add("attention", layer, m, deps=last[m])
                if self.segment_a2e:
                    a2e = [add("a2e", layer, m, j, deps=(attention,)) for j in range(r2)]
                else:
                    a2e = [add("a2e", layer, m, deps=(attention,))] * r2
                if shared and self.order == "ASAS":
                    shared_names[m] = add("shared", layer, m, deps=(attention,))
                back = []
                for j in range(r2):
                    experts = add("experts", layer, m, j, deps=(a2e[j],))
                    back.append(add("e2a", layer, m, j, deps=(experts,)))
                last[m] = tuple(back)
            if shared and self.order == "AASS":
                for m in range(r1):
                    shared_names[m] = add("shared", layer, m, deps=(task_name("attention", layer, m),))
            for m in range(r1):
                if shared:
                    last[m] = last[m] + (shared_names[m],)
                pending[m], out_layer[m] = True, layer
        for m in range(r1):
            settle(m)
            if head:
                last[m] = (add("head", micro=m, deps=last[m]),)
        return out


def layer_kinds(cfg) -> tuple[str, ...]:
    """"dense" / "moe" per layer of a ModelConfig."""
    return tuple("moe" if cfg.is_moe_layer(layer) else "dense" for layer in range(cfg.num_layers))
