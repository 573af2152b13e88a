"""Did the two groups run at the same time? A CPU diagnostic from the JAX profiler's trace.

On the CPU client every HLO op in the Perfetto trace carries the device that ran it; this module merges each
group's op intervals and reports how long each group was busy and how long both were, for an asynchronous and a
serialized (block after every task) run of the same schedule:

    .venv/bin/python -m epsjax.dep.overlap            # writes scripts/results/findep_cpu_overlap.json

What it found on the 2-core development machine (scripts/results/findep_cpu_overlap.json): the CPU client runs
device programs on a pool of about one worker thread per core, first come first served, so with 2 cores a group
of >= 2 devices fills the pool and the other group's program waits (two independent 2-device programs on
disjoint devices serialize too): with 4 + 4 the groups are rarely busy together. With one device per group
(1 + 1) the pipelined schedules keep both groups busy at once for a third to a half of the run, serialized runs
never. The wall time does not reliably drop: two cores are shared by both groups and the dispatching host
thread, so overlapping is time-slicing, not extra compute (runs differ by +-15%). Real speedups need devices
that compute independently (GPUs); the simulator models those.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import glob
import gzip
import json
import pathlib
import tempfile

import jax
import numpy as np


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x, y) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def measure(runtime, tokens, mask, schedule, *, serialize: bool = False) -> dict:
    """Milliseconds each group was busy, both were, and the wall time of one prefill (after a warm-up)."""
    runtime.prefill(tokens, mask, schedule=schedule, serialize=serialize)
    attention_ids = {d.id for d in runtime.groups.attention_devices}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        out = runtime.prefill(tokens, mask, schedule=schedule, serialize=serialize)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    busy = {"attention": [], "experts": []}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "device_ordinal" in args and "hlo_module" in args:
            group = "attention" if int(args["device_ordinal"]) in attention_ids else "experts"
            busy[group].append((e["ts"], e["ts"] + e["dur"]))
    ag, eg = _union(busy["attention"]), _union(busy["experts"])
    return {"schedule": schedule.describe(), "serialized": serialize, "wall_ms": out.seconds * 1e3,
            "attention_busy_ms": _length(ag) / 1e3, "experts_busy_ms": _length(eg) / 1e3,
            "both_busy_ms": _intersection(ag, eg) / 1e3}


def main(out_path: pathlib.Path | None = None) -> list[dict]:
    from flax import nnx

    from epsjax.dep import DEPGroups, DEPSchedule
    from epsjax.dep.runtime import DEPRuntime
    from epsjax.models import MoETransformer, get_preset
    from epsjax.models.config import RouterConfig

    # A toy model whose attention and expert FFN take comparable time on this CPU.
    cfg = get_preset("tiny-qwen3-moe").replace(d_model=512, num_heads=16, num_kv_heads=4, head_dim=64,
                                               expert_ffn_dim=512, num_layers=5, router=RouterConfig(top_k=2),
                                               dense_ffn_dim=512)
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    results = []
    for ag, eg, batch in ((1, 1, 4), (4, 4, 16)):
        tokens = rng.integers(1, 256, (batch, 256)).astype(np.int32)
        mask = np.ones(tokens.shape, bool)
        runtime = DEPRuntime(model, DEPGroups.split(ag, eg, cfg.num_experts))
        for schedule in (DEPSchedule.naive(), DEPSchedule.pppipe(2), DEPSchedule.pppipe(4),
                         DEPSchedule.findep(4, 2, "ASAS")):
            for serialize in (False, True):
                row = {"split": f"{ag}+{eg}", "batch": batch, "seq_len": 256,
                       **measure(runtime, tokens, mask, schedule, serialize=serialize)}
                results.append(row)
                print(f"{row['split']:4} {row['schedule']:26} {'serialized' if serialize else 'async     '} "
                      f"wall {row['wall_ms']:7.1f} ms  attention busy {row['attention_busy_ms']:6.1f}  experts busy "
                      f"{row['experts_busy_ms']:6.1f}  both {row['both_busy_ms']:6.1f} ms")
    out_path = out_path or pathlib.Path(__file__).resolve().parents[2] / "scripts" / "results" / "findep_cpu_overlap.json"
    out_path.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
