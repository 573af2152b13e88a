"""Timeline simulator: tasks on streams with dependencies -> start/end times, Gantt PNG, Perfetto trace.

A schedule is a list of tasks in issue order. Each task occupies one or more streams (a collective occupies the
communication stream of every participant) for a fixed duration, computed beforehand by the cost models for the
SMs its stream owns (the SM partition). Like CUDA streams, a stream runs its tasks one at a time in issue order;
a task starts when all its streams are free and all its dependencies have ended:

    start(t) = max(max over streams s of t: end of the previous task on s,  max over deps d of t: end(d))
    end(t)   = start(t) + duration(t)

Times are max-plus expressions of the durations, so shortening any task never delays another (the property the
plan search relies on when it picks the fastest kernel per stage independently).

The Gantt chart has one row per stream (streams are named "<device>/<stream>", e.g. "gpu0/comm") and one colour
per task kind. The trace is Chrome trace-event JSON (ui.perfetto.dev opens it): one process per device, one
thread per stream.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterable, NamedTuple

from epsjax.scheduler.errors import ScheduleError

KIND_COLORS = {
    "attention": "#4C72B0", "router": "#8172B2", "permute": "#64B5CD", "unpermute": "#64B5CD",
    "expert_gemm": "#DD8452", "shared_ffn": "#C4A000", "dense_ffn": "#C4A000", "lm_head": "#937860",
    "dispatch": "#55A868", "combine": "#2E8B57", "allreduce": "#C44E52", "allgather": "#DA8BC3",
    "reducescatter": "#E377C2", "send": "#17BECF", "recv": "#17BECF", "h2d": "#7F7F7F",
}


class Task(NamedTuple):
    """One kernel (or one collective over several devices' streams).

    name: unique in its schedule. kind: colour / category ("expert_gemm", "dispatch", ...).
    streams: the streams it occupies. deps: names of tasks that must end before it starts (issued earlier).
    meta: free-form facts for the trace (bytes, rows, backend, stage, ...) as (key, value) pairs.
    """

    name: str
    kind: str
    streams: tuple[str, ...]
    duration: float
    deps: tuple[str, ...] = ()
    meta: tuple[tuple[str, object], ...] = ()


@dataclasses.dataclass
class Schedule:
    """Tasks in issue order, the SM partition behind their durations, and what they accomplish.

    sm_partition: device -> {"compute": SMs, "comm": SMs} (informational: durations already account for it).
    tokens: tokens the schedule processes (for throughput). meta: plan and workload facts for the outputs.
    """

    name: str
    tasks: list[Task] = dataclasses.field(default_factory=list)
    sm_partition: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    tokens: float = 0.0
    meta: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, kind: str, streams, duration: float, deps: Iterable[str] = (), **meta) -> str:
        """Appends a task (issue order = call order) and returns its name."""
        streams = (streams,) if isinstance(streams, str) else tuple(streams)
        if not streams:
            raise ScheduleError(f"task {name!r} occupies no stream")
        if not duration >= 0:
            raise ScheduleError(f"task {name!r}: duration must be >= 0, got {duration!r}")
        self.tasks.append(Task(name, kind, streams, float(duration), tuple(deps), tuple(meta.items())))
        return name

    @property
    def streams(self) -> list[str]:
        seen = {}
        for task in self.tasks:
            for s in task.streams:
                seen.setdefault(s, None)
        return sorted(seen, key=_stream_key)


def _stream_key(stream: str):
    device, _, lane = stream.partition("/")
    digits = "".join(ch for ch in device if ch.isdigit())
    return (device.rstrip("0123456789"), int(digits) if digits else -1, lane != "compute", lane)


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Start and end of every task of a schedule."""

    schedule: Schedule
    start: dict[str, float]
    end: dict[str, float]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    @property
    def throughput(self) -> float:
        """Tokens per second of the schedule (its tokens over its makespan)."""
        return self.schedule.tokens / self.makespan if self.makespan > 0 else float("inf")

    def busy(self, stream: str) -> float:
        return sum(t.duration for t in self.schedule.tasks if stream in t.streams)

    def utilization(self) -> dict[str, float]:
        span = self.makespan or 1.0
        return {s: self.busy(s) / span for s in self.schedule.streams}

    def by_kind(self) -> dict[str, float]:
        """Summed durations per task kind (a collective counted once)."""
        out: dict[str, float] = {}
        for t in self.schedule.tasks:
            out[t.kind] = out.get(t.kind, 0.0) + t.duration
        return out


def simulate(schedule: Schedule) -> Timeline:
    """Plays the schedule out (see the module docstring). Raises ScheduleError on unknown or later dependencies
    and on duplicate names."""
    free: dict[str, float] = {}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for task in schedule.tasks:
        if task.name in end:
            raise ScheduleError(f"duplicate task name {task.name!r} in schedule {schedule.name!r}")
        t0 = 0.0
        for s in task.streams:
            t0 = max(t0, free.get(s, 0.0))
        for d in task.deps:
            if d not in end:
                raise ScheduleError(f"task {task.name!r} depends on {d!r}, which is not issued before it")
            t0 = max(t0, end[d])
        t1 = t0 + task.duration
        start[task.name], end[task.name] = t0, t1
        for s in task.streams:
            free[s] = t1
    return Timeline(schedule, start, end)


# Outputs ------------------------------------------------------------------------------------------------------------

def chrome_trace(timeline: Timeline) -> dict:
    """Chrome trace-event JSON (Perfetto): complete events ("X") in microseconds, one pid per device."""
    streams = timeline.schedule.streams
    devices = sorted({s.partition("/")[0] for s in streams}, key=lambda d: _stream_key(d + "/"))
    pid = {d: i for i, d in enumerate(devices)}
    tid = {s: i for i, s in enumerate(streams)}
    events = []
    for d in devices:
        events.append({"ph": "M", "name": "process_name", "pid": pid[d], "tid": 0, "args": {"name": d}})
    for s in streams:
        d = s.partition("/")[0]
        events.append({"ph": "M", "name": "thread_name", "pid": pid[d], "tid": tid[s],
                       "args": {"name": s.partition("/")[2] or s}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid[d], "tid": tid[s],
                       "args": {"sort_index": tid[s]}})
    for task in timeline.schedule.tasks:
        args = {k: _jsonable(v) for k, v in task.meta}
        args["deps"] = list(task.deps)
        args["duration_us"] = task.duration * 1e6
        for s in task.streams:
            events.append({"ph": "X", "name": task.name, "cat": task.kind, "pid": pid[s.partition("/")[0]],
                           "tid": tid[s], "ts": timeline.start[task.name] * 1e6, "dur": task.duration * 1e6,
                           "args": args})
    meta = {k: _jsonable(v) for k, v in timeline.schedule.meta.items()}
    meta.update(makespan_s=timeline.makespan, tokens=timeline.schedule.tokens,
                sm_partition=timeline.schedule.sm_partition)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}


def write_trace(timeline: Timeline, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.write_text(json.dumps(chrome_trace(timeline)) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def gantt(timeline: Timeline, path: str | pathlib.Path, *, title: str | None = None,
          max_label_fraction: float = 0.04) -> pathlib.Path:
    """A Gantt chart PNG: one row per stream, one colour per task kind, times in milliseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    streams = timeline.schedule.streams
    row = {s: i for i, s in enumerate(streams)}
    span_ms = timeline.makespan * 1e3 or 1.0
    fig, ax = plt.subplots(figsize=(13, 0.9 + 0.34 * len(streams)))
    kinds = []
    for task in timeline.schedule.tasks:
        if task.duration <= 0:
            continue
        color = KIND_COLORS.get(task.kind, "#999999")
        if task.kind not in kinds:
            kinds.append(task.kind)
        x0, w = timeline.start[task.name] * 1e3, task.duration * 1e3
        for s in task.streams:
            ax.broken_barh([(x0, w)], (row[s] - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.3)
            if w > max_label_fraction * span_ms and len(task.streams) == 1:
                ax.text(x0 + w / 2, row[s], task.name.split("/")[-1], ha="center", va="center", fontsize=5,
                        clip_on=True)
    ax.set_yticks(range(len(streams)))
    ax.set_yticklabels(streams, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, span_ms * 1.01)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", linewidth=0.3)
    ax.legend(handles=[Patch(color=KIND_COLORS.get(k, "#999999"), label=k) for k in kinds], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or f"{timeline.schedule.name}: {span_ms:.3f} ms", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
