"""FinDEP in simulation: naive DEP, PPPipe and FinDEP side by side on the paper's testbeds, with the paper's figures.

For each (testbed, model, attention/expert split) the script builds FinDEP's problem from epsjax.scheduler's cost
models (epsjax/dep/problem.py: linear task models fitted over the explored sizes, memory limits, as many layers
as the weights leave room for), lets the solver pick each schedule's plan (naive: r1 = r2 = 1; PPPipe: r1
micro-batches, r2 = 1, shared experts with their attention; FinDEP: ma, r1, r2, the AASS/ASAS order and whether
A2E is segmented), PPPipe with MegaScale-Infer's ping-pong rule for r1 (epsjax/dep/workloads.py), and simulates
the chosen plans with the cost models themselves (not the linear fits). It prints a table and writes

    scripts/results/findep_simulation.json          every number: plans, fits, memory, solver time, sources
    scripts/results/findep_<setting>.png           one MoE layer under each schedule (Gantt, cost-model durations)
    scripts/results/findep_<setting>.trace.json    the same three layers as a Perfetto / Chrome trace
    scripts/results/findep_seq_sweep.png           the plan the solver picks as the prompt length changes

Every schedule here runs the largest batch memory allows; scripts/simulate_findep_workloads.py has the fixed-batch,
TTFT-bound and decode workloads.

    .venv/bin/python scripts/simulate_findep.py [--seq-len 1024] [--out-dir DIR] [--quick]

Nothing is fitted to the paper's numbers. The paper (arXiv:2512.21487) reports only its best cases in the
abstract available to us: up to 1.61x over PPPipe on the 8-GPU testbeds, 1.24x on 32 x H20.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epsjax.dep import Deployment, TaskCosts, fit_layers, problem_for, solve  # noqa: E402
from epsjax.dep.perf import TESTBEDS  # noqa: E402
from epsjax.dep.simulate import build_schedule, simulate_plan  # noqa: E402
from epsjax.dep.workloads import pingpong_rule  # noqa: E402
from epsjax.scheduler.simulator import KIND_COLORS, Timeline, chrome_trace, simulate  # noqa: E402
from epsjax.models.config import get_preset  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    testbed: str
    model: str
    ag: int
    eg: int
    paper: str  # what the paper reports for this setting

    @property
    def key(self) -> str:
        return f"{self.testbed}_{self.model}_{self.ag}-{self.eg}".replace(".", "")


PAPER_8 = "<=1.61x over PPPipe"  # the abstract's best case over the 8-GPU testbeds and both models
SETTINGS = (
    Setting("8xA6000", "deepseek-v2", 3, 5, PAPER_8),
    Setting("8xA6000", "qwen3-30b-a3b", 4, 4, PAPER_8),
    Setting("8xA10", "deepseek-v2", 3, 5, PAPER_8),
    Setting("8xA10", "qwen3-30b-a3b", 4, 4, PAPER_8),
    Setting("8xH20", "deepseek-v2", 3, 5, PAPER_8),
    Setting("8xH20", "qwen3-30b-a3b", 4, 4, PAPER_8),
    Setting("32xH20", "deepseek-v2", 8, 24, "1.24x over PPPipe"),
)
SCHEDULES = ("naive", "pingpong", "pppipe", "findep")
# space searched: PPPipe with r1 from MegaScale-Infer's ping-pong rule (workloads.pingpong_rule), and PPPipe with its
# r1 tuned like FinDEP's.
SPACES = {"naive": "naive", "pppipe": "pppipe", "findep": "findep"}
LABEL = {"naive": "naive DEP", "pingpong": "PPPipe, ping-pong rule", "pppipe": "PPPipe (r1 tuned)", "findep": "FinDEP"}
DEP_COLORS = {"embed": KIND_COLORS["permute"], "dense": KIND_COLORS["dense_ffn"], "attention": KIND_COLORS["attention"],
              "shared": KIND_COLORS["shared_ffn"], "combine": KIND_COLORS["unpermute"], "head": KIND_COLORS["lm_head"],
              "a2e": KIND_COLORS["dispatch"], "experts": KIND_COLORS["expert_gemm"], "e2a": KIND_COLORS["combine"]}


SHORT = {"attention": "attn", "shared": "shared", "a2e": "a2e", "experts": "ffn", "e2a": "e2a", "combine": "comb"}


def run_setting(s: Setting, seq_len: int, max_r: int) -> tuple[dict, dict]:
    deployment = Deployment.split(TESTBEDS[s.testbed], s.ag, s.eg)
    cfg = fit_layers(get_preset(s.model), deployment)
    costs = TaskCosts(cfg, deployment, seq_len)
    problem = problem_for(cfg, deployment, seq_len, max_micro_batches=max_r, max_segments=max_r, task_costs=costs)
    rows, timelines = {}, {}
    for space in SCHEDULES:
        solution = _solve(problem, space)
        plan = solution.plan
        step = simulate_plan(problem, plan, costs.seconds)
        layer = simulate(build_schedule(problem, plan, costs.seconds, layer_kinds=("moe",), embed=False, head=False))
        timelines[space] = layer
        rows[space] = {**solution.as_dict(), "tokens_per_s_linear": solution.throughput,
                       "tokens_per_s": step.throughput, "step_s": step.makespan, "tokens": problem.tokens(plan),
                       "moe_layer_s": layer.makespan, "utilization_one_layer": layer.utilization()}
    for space in SCHEDULES:
        for base in ("naive", "pingpong", "pppipe"):
            rows[space][f"speedup_vs_{base}"] = rows[space]["tokens_per_s"] / rows[base]["tokens_per_s"]
    memory = costs.memory()
    result = {
        "setting": dataclasses.asdict(s), "deployment": deployment.describe(), "testbed_note": deployment.testbed.note,
        "model_layers": f"{cfg.num_layers} of {get_preset(s.model).num_layers}", "seq_len": seq_len,
        "experts_per_expert_device": list(costs.experts_per_device),
        "memory_gb": {"ag_weights": memory.ag_fixed / 1e9, "eg_weights": memory.eg_fixed / 1e9,
                      "limit_per_device": memory.ag_limit / 1e9},
        "linear_models": problem.models.as_dict(), "schedules": rows, "paper": s.paper,
        "cost_sources": dict(costs.costs.sources),
    }
    return result, timelines


def _solve(problem, schedule: str):
    """The solver's plan of a space (linear models), or the ping-pong rule's (each r1 at its largest ma)."""
    return pingpong_rule(problem) if schedule == "pingpong" else solve(problem, SPACES[schedule])


def decode_rows(settings, context: int, max_r: int) -> list[dict]:
    """The same settings decoding one token per sequence after `context` cached ones (KV-cache bound)."""
    out = []
    for s in settings:
        deployment = Deployment.split(TESTBEDS[s.testbed], s.ag, s.eg)
        cfg = fit_layers(get_preset(s.model), deployment)
        costs = TaskCosts(cfg, deployment, 1, context)
        problem = problem_for(cfg, deployment, 1, context, max_micro_batches=max_r, max_segments=max_r,
                              task_costs=costs)
        plans = {k: _solve(problem, k).plan for k in SCHEDULES}
        rates = {k: simulate_plan(problem, plan, costs.seconds).throughput for k, plan in plans.items()}
        out.append({"setting": s.key, "context": context, "tokens_per_s": rates,
                    "plans": {k: p.as_dict() for k, p in plans.items()},
                    "findep_vs_pppipe": rates["findep"] / rates["pppipe"],
                    "findep_vs_pingpong": rates["findep"] / rates["pingpong"]})
    return out


def _plan(p: dict) -> str:
    return f"ma={p['ma']} r1={p['r1']} r2={p['r2']} {p['order']}" + (" A2E/seg" if p.get("segment_a2e") else "")


def gantt_panels(timelines: dict[str, Timeline], path: pathlib.Path, title: str) -> None:
    """One row of panels per schedule, one lane per stream, on a shared time axis (ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    span = max(t.makespan for t in timelines.values()) * 1e3
    fig, axes = plt.subplots(len(timelines), 1, figsize=(13, 1.2 + 1.45 * len(timelines)), sharex=True)
    for ax, (space, tl) in zip(axes, timelines.items()):
        streams = tl.schedule.streams
        for task in tl.schedule.tasks:
            if task.duration <= 0:
                continue
            x0, w = tl.start[task.name] * 1e3, task.duration * 1e3
            row = streams.index(task.streams[0])
            ax.broken_barh([(x0, w)], (row - 0.4, 0.8), facecolors=DEP_COLORS.get(task.kind, "#999999"),
                           edgecolor="white", linewidth=0.4)
            if w > 0.035 * span:
                kind, _, where = task.name[:-1].partition("[")
                label = SHORT.get(kind, kind) + " " + ".".join(p for p in where.split(".") if p[0] in "ms")
                ax.text(x0 + w / 2, row, label, ha="center", va="center", fontsize=5.5, clip_on=True)
        plan = tl.schedule.meta
        ax.set_title(f"{LABEL[space]} ({_plan(plan)}): {tl.makespan * 1e3:.1f} ms for {tl.schedule.tokens:.0f} "
                     "tokens", fontsize=8, loc="left")
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels(streams, fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", linewidth=0.3)
    axes[-1].set_xlabel("time (ms)")
    axes[-1].set_xlim(0, span * 1.01)
    kinds = ["attention", "shared", "a2e", "experts", "e2a", "combine"]
    fig.legend(handles=[Patch(color=DEP_COLORS[k], label=k) for k in kinds], loc="upper right", fontsize=7, ncol=6)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seq_sweep(out_dir: pathlib.Path, max_r: int) -> list[dict]:
    """The solver re-planning as the prompt length changes (8xA10, DeepSeek-V2 3/5): plan and solve time."""
    deployment = Deployment.split(TESTBEDS["8xA10"], 3, 5)
    cfg = fit_layers(get_preset("deepseek-v2"), deployment)
    out = []
    for seq_len in (128, 256, 512, 1024, 2048, 4096, 8192):
        costs = TaskCosts(cfg, deployment, seq_len)
        problem = problem_for(cfg, deployment, seq_len, max_micro_batches=max_r, max_segments=max_r,
                              task_costs=costs)
        best = {space: _solve(problem, space) for space in SCHEDULES}
        rates = {space: simulate_plan(problem, sol.plan, costs.seconds).throughput for space, sol in best.items()}
        out.append({"seq_len": seq_len, "plan": best["findep"].plan.as_dict(),
                    "solve_ms": best["findep"].seconds * 1e3, "evaluated": best["findep"].evaluated,
                    "tokens_per_s": rates, "findep_vs_pppipe": rates["findep"] / rates["pppipe"],
                    "findep_vs_pingpong": rates["findep"] / rates["pingpong"]})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    xs = [r["seq_len"] for r in out]
    for space in SCHEDULES:
        ax.plot(xs, [r["tokens_per_s"][space] / 1e3 for r in out], marker="o", label=LABEL[space])
    for r in out:
        p = r["plan"]
        ax.annotate(f"{p['ma']}x{p['r1']},{p['r2']} {p['order']}", (r["seq_len"], r["tokens_per_s"]["findep"] / 1e3),
                    fontsize=6, textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xscale("log", base=2)
    ax.margins(y=0.15)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("k tokens/s")
    ax.set_title(f"8xA10, {cfg.name} ({cfg.num_layers} layers) 3/5: FinDEP plan (ma x r1, r2 order) per length",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(linewidth=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "findep_seq_sweep.png", dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024, help="prompt tokens per sequence (prefill)")
    parser.add_argument("--max-r", type=int, default=8, help="largest r1 and r2 searched")
    parser.add_argument("--decode-context", type=int, default=2048, help="cached tokens in the decode rows")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "scripts" / "results")
    parser.add_argument("--quick", action="store_true", help="two settings, no sweep (for tests)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS[2:4] if args.quick else SETTINGS
    started = time.perf_counter()
    results = []
    header = (f"{'testbed':8} {'model':14} {'ag/eg':5} {'layers':8} | {'naive':>7} {'PP rule':>7} {'PPPipe':>7} "
              f"{'FinDEP':>7} k tok/s | {'F/rule':>6} {'F/PP':>5} {'F/naive':>7} | {'FinDEP plan':29} {'solve':>7} "
              "| paper")
    print(header)
    print("-" * len(header))
    for s in settings:
        result, timelines = run_setting(s, args.seq_len, args.max_r)
        results.append(result)
        rows = result["schedules"]
        plan = rows["findep"]["plan"]
        f = rows["findep"]
        print(f"{s.testbed:8} {s.model:14} {s.ag}/{s.eg:<3} {result['model_layers']:8} | "
              + " ".join(f"{rows[k]['tokens_per_s'] / 1e3:7.1f}" for k in SCHEDULES)
              + f"         | {f['speedup_vs_pingpong']:6.2f} {f['speedup_vs_pppipe']:5.2f} "
              + f"{f['speedup_vs_naive']:7.2f} | {_plan(plan):29} "
              f"{f['solve_ms']:5.1f}ms | {s.paper}")
        title = (f"{s.testbed} {s.model} ({result['model_layers']} layers), attention {s.ag} / experts {s.eg} GPUs, "
                 f"prompts of {args.seq_len} tokens: one MoE layer")
        gantt_panels(timelines, args.out_dir / f"findep_{s.key}.png", title)
        trace = {space: chrome_trace(tl) for space, tl in timelines.items()}
        (args.out_dir / f"findep_{s.key}.trace.json").write_text(json.dumps(trace) + "\n")
    out = {"seq_len": args.seq_len, "max_r": args.max_r, "settings": results,
           "paper": {"source": "arXiv:2512.21487 abstract", "max_speedup_over_pppipe": 1.61,
                     "speedup_32xh20": 1.24},
           "assumptions": {
               "workload": "prefill of prompts of seq_len tokens, batch as large as memory allows "
                           "(each schedule gets its own best ma under the same limits)",
               "links": "A2E/E2A as all-to-all over the testbed links (epsjax/dep/perf.py); copy engines, no SMs "
                        "taken from compute", "routing": "uniform over experts",
               "memory": "90% of device memory usable; weights at most 75% of it (fewer layers otherwise)"},
           "seconds": time.perf_counter() - started}
    if not args.quick:
        out["decode"] = decode_rows(settings, args.decode_context, args.max_r)
        print(f"\ndecode (1 new token after {args.decode_context} cached; batch bound by the KV cache):")
        for r in out["decode"]:
            t = r["tokens_per_s"]
            print(f"  {r['setting']:32} naive {t['naive']:8.0f}  PP rule {t['pingpong']:8.0f}  "
                  f"PPPipe {t['pppipe']:8.0f}  FinDEP {t['findep']:8.0f} tok/s  F/PP {r['findep_vs_pppipe']:.3f}")
        out["seq_sweep"] = seq_sweep(args.out_dir, args.max_r)
        print("\nre-planning as the prompt length changes (8xA10, deepseek-v2 3/5):")
        for r in out["seq_sweep"]:
            p = r["plan"]
            print(f"  S={r['seq_len']:5}: {_plan(p):29}  "
                  f"FinDEP/PPPipe {r['findep_vs_pppipe']:.3f}  FinDEP/ping-pong rule {r['findep_vs_pingpong']:.2f}  "
                  f"solve {r['solve_ms']:.1f} ms")
    (args.out_dir / "findep_simulation.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
