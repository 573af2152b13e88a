"""FinDEP on the workloads users run: fixed prefill batches, a TTFT-bound prefill, decode steps, skewed routing.

scripts/simulate_findep.py runs every schedule at the largest batch memory allows, where a tuned PPPipe already
keeps the bottleneck busy. Here the batch is set by the workload instead (epsjax/dep/workloads.py), on the same
testbeds, models and splits, and four schedules are compared, each with its best plan for the workload (an
exhaustive search with the cost models, not the solver's linear fits):

    rule         PPPipe with r1 from MegaScale-Infer's ping-pong rule, m >= 2 (1 + T_c / T_f)  (arXiv:2504.02263)
    pppipe       PPPipe with r1 tuned (r2 = 1, shared experts with their attention)
    findep_whole FinDEP with A2E whole per micro-batch (the space before segmented A2E)
    findep       FinDEP: r1, r2, AASS / ASAS, A2E whole or per segment

Workloads (b: sequences per attention device; ag * b in all):

    prefill   prompts of --seq-len (and --other-seq-lens) tokens, b fixed (--batches)   step time, tokens/s
    ttft      the largest b whose prefill step fits a budget (--budgets, s)     b, tokens/s
    decode    one token per sequence after --contexts cached tokens, b fixed    step time (TPOT), tokens/s
    skew      prefill and decode rows again under Zipf(s) routing (--zipf): experts' shares 1 / rank^s, shuffled
              over the expert devices; the expert group runs at the pace of its most loaded device

It writes scripts/results/findep_workloads.json (every plan and number), findep_workloads.md (the tables) and
findep_workloads.png (FinDEP's speedups), and prints progress as it goes.

    .venv/bin/python scripts/simulate_findep_workloads.py [--out-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from epsjax.dep import Deployment, TaskCosts, fit_layers, problem_for  # noqa: E402
from epsjax.dep.perf import TESTBEDS, zipf_shares  # noqa: E402
from epsjax.dep.solver import shapes  # noqa: E402
from epsjax.dep import workloads  # noqa: E402
from epsjax.models.config import get_preset  # noqa: E402
from simulate_findep import SETTINGS, Setting  # noqa: E402

SCHEDULES = ("rule", "pppipe", "findep_whole", "findep")
LABEL = {"rule": "PPPipe, ping-pong rule", "pppipe": "PPPipe (r1 tuned)", "findep_whole": "FinDEP, A2E whole",
         "findep": "FinDEP"}


def _spaces(problem) -> dict:
    findep = shapes(problem, "findep")
    return {"pppipe": "pppipe", "findep_whole": [s for s in findep if not s.segment_a2e], "findep": findep}


def _plan(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"ma={p['ma']} r1={p['r1']} r2={p['r2']} {p['order']}" + (" A2E/seg" if p.get("segment_a2e") else "")


class Context:
    """One setting's model on its deployment; problems per (seq_len, context, routing) built on demand."""

    def __init__(self, s: Setting):
        self.setting = s
        self.deployment = Deployment.split(TESTBEDS[s.testbed], s.ag, s.eg)
        self.cfg = fit_layers(get_preset(s.model), self.deployment)
        self._problems = {}

    def problem(self, seq_len: int, context: int = 0, zipf: float | None = None):
        key = (seq_len, context, zipf)
        if key not in self._problems:
            routing = None if zipf is None else zipf_shares(self.cfg.num_experts, zipf)
            costs = TaskCosts(self.cfg, self.deployment, seq_len, context, routing=routing)
            self._problems[key] = (problem_for(self.cfg, self.deployment, seq_len, context, task_costs=costs), costs)
        return self._problems[key]

    def fixed(self, seq_len: int, context: int, b: int, zipf: float | None = None) -> dict:
        """Every schedule's best plan for b sequences per attention device."""
        problem, costs = self.problem(seq_len, context, zipf)
        out = {"rule": workloads.pingpong_rule(problem, costs.seconds, b)}
        for name, space in _spaces(problem).items():
            out[name] = workloads.for_batch(problem, b, space, costs.seconds)
        row = {k: v.as_dict() for k, v in out.items()}
        if out["findep"].plan is not None:
            row["findep_vs_pppipe"] = out["pppipe"].makespan / out["findep"].makespan
            row["findep_vs_rule"] = out["rule"].makespan / out["findep"].makespan
            row["findep_vs_findep_whole"] = out["findep_whole"].makespan / out["findep"].makespan
        rule_plan = out["rule"].plan
        if rule_plan is not None:
            row["rule_terms"] = workloads.rule_terms(problem, rule_plan, costs.seconds)
        return row

    def budget(self, seq_len: int, budget_s: float) -> dict:
        problem, costs = self.problem(seq_len)
        out = {name: workloads.within_budget(problem, budget_s, space, costs.seconds)
               for name, space in _spaces(problem).items()}
        out["rule"] = workloads.pingpong_within_budget(problem, budget_s, costs.seconds, out["pppipe"].sequences)
        return {k: v.as_dict() for k, v in out.items()}

    def describe(self) -> dict:
        s = self.setting
        return {"setting": s.key, "testbed": s.testbed, "model": s.model, "split": f"{s.ag}/{s.eg}",
                "layers": f"{self.cfg.num_layers} of {get_preset(s.model).num_layers}"}


def run(settings, args) -> dict:
    out = {"prefill": [], "ttft": [], "decode": [], "skew": []}
    for i, s in enumerate(settings):
        started = time.perf_counter()
        ctx = Context(s)
        head = ctx.describe()
        for seq_len in [args.seq_len] + args.other_seq_lens:
            for b in args.batches:
                out["prefill"].append({**head, "seq_len": seq_len, "b": b, **ctx.fixed(seq_len, 0, b)})
        for budget in args.budgets:
            out["ttft"].append({**head, "seq_len": args.seq_len, "budget_s": budget,
                                **ctx.budget(args.seq_len, budget)})
        for context in args.contexts:
            problem, _ = ctx.problem(1, context)
            largest = int(problem.memory.max_tokens(1, 1))
            for b in sorted({b for b in args.decode_batches if b <= largest} | {largest}):
                out["decode"].append({**head, "context": context, "b": b, "memory_max": b == largest,
                                      **ctx.fixed(1, context, b)})
        for zipf in args.zipf:
            imbalance = ctx.problem(args.seq_len, 0, zipf)[1].imbalance
            for b in args.skew_batches:
                out["skew"].append({**head, "zipf": zipf, "imbalance": imbalance, "workload": "prefill",
                                    "seq_len": args.seq_len, "b": b, **ctx.fixed(args.seq_len, 0, b, zipf)})
            out["skew"].append({**head, "zipf": zipf, "imbalance": imbalance, "workload": "decode",
                                "context": args.contexts[0], "b": args.skew_decode_batch,
                                **ctx.fixed(1, args.contexts[0], args.skew_decode_batch, zipf)})
        print(f"[{i + 1}/{len(settings)}] {s.key}: {head['layers']} layers, {time.perf_counter() - started:.1f} s",
              flush=True)
    return out


# Tables -------------------------------------------------------------------------------------------------------------

def _ms(row, k):
    step = row[k]["step_s"]
    return "-" if step is None else f"{step * 1e3:.1f}"


def _x(row, key):
    return f"{row[key]:.3f}" if key in row else "-"


def tables(out: dict, args) -> str:
    lines = ["# FinDEP on fixed batches, a TTFT bound, decode steps and skewed routing (simulated)", "",
             "Written by scripts/simulate_findep_workloads.py from epsjax.scheduler's cost models (no constant tuned",
             "to any paper). b: sequences per attention device. Step times in ms. F/PP: FinDEP over tuned PPPipe",
             "(step-time ratio, > 1: FinDEP faster); F/rule: over PPPipe with MegaScale-Infer's ping-pong rule;",
             "F/whole: FinDEP over FinDEP without segmented A2E. Plans: ma x r1 micro-batches, r2 segments.", ""]
    cols = "| testbed | model | ag/eg | layers |"
    lines += ["## Prefill, fixed batch (prompts of S tokens; '-': does not fit in memory)", "",
              cols + " S | b | rule | PPPipe | FinDEP whole A2E | FinDEP | F/PP | F/rule | F/whole | FinDEP plan |",
              "|" + "---|" * 14]
    for r in sorted(out["prefill"], key=lambda r: r["seq_len"]):
        lines.append(f"| {r['testbed']} | {r['model']} | {r['split']} | {r['layers']} | {r['seq_len']} | {r['b']} | "
                     + " | ".join(_ms(r, k) for k in SCHEDULES)
                     + f" | {_x(r, 'findep_vs_pppipe')} | {_x(r, 'findep_vs_rule')} | {_x(r, 'findep_vs_findep_whole')}"
                     f" | {_plan(r['findep']['plan'])} |")
    lines += ["", f"## TTFT-bound prefill (prompts of {args.seq_len} tokens): the largest b whose step fits the budget",
              "", "b and k tokens/s per schedule; '-': not even b = 1 fits.", "",
              cols + " budget s | rule | PPPipe | FinDEP whole A2E | FinDEP | FinDEP plan |", "|" + "---|" * 10]
    for r in out["ttft"]:
        cells = [("-" if r[k]["plan"] is None else f"{r[k]['sequences']}: {r[k]['tokens_per_s'] / 1e3:.1f}k")
                 for k in SCHEDULES]
        lines.append(f"| {r['testbed']} | {r['model']} | {r['split']} | {r['layers']} | {r['budget_s']} | "
                     + " | ".join(cells) + f" | {_plan(r['findep']['plan'])} |")
    lines += ["", "## Decode: one token per sequence after `context` cached tokens (step = time per output token)", "",
              "max: the largest b the KV cache leaves room for.", "",
              cols + " context | b | rule | PPPipe | FinDEP | F/PP | F/rule | FinDEP plan | rule's m, T_c/T_f |",
              "|" + "---|" * 14]
    for r in out["decode"]:
        t = r.get("rule_terms", {})
        rule = r["rule"]["plan"]
        m = "-" if rule is None else f"{rule['r1']}, {t['T_c'] / t['T_f']:.2f}"
        lines.append(f"| {r['testbed']} | {r['model']} | {r['split']} | {r['layers']} | {r['context']} | "
                     f"{r['b']}{' (max)' if r['memory_max'] else ''} | "
                     + " | ".join(_ms(r, k) for k in ("rule", "pppipe", "findep"))
                     + f" | {_x(r, 'findep_vs_pppipe')} | {_x(r, 'findep_vs_rule')} | {_plan(r['findep']['plan'])} "
                     f"| {m} |")
    lines += ["", "## Skewed routing: Zipf(s) expert shares (imbalance: most loaded expert device / mean)", "",
              cols + " s | imbalance | workload | b | rule | PPPipe | FinDEP | F/PP | F/rule | FinDEP plan |",
              "|" + "---|" * 14]
    for r in out["skew"]:
        work = f"prefill {r['seq_len']}" if r["workload"] == "prefill" else f"decode @{r['context']}"
        lines.append(f"| {r['testbed']} | {r['model']} | {r['split']} | {r['layers']} | {r['zipf']} | "
                     f"{r['imbalance']:.2f} | {work} | {r['b']} | "
                     + " | ".join(_ms(r, k) for k in ("rule", "pppipe", "findep"))
                     + f" | {_x(r, 'findep_vs_pppipe')} | {_x(r, 'findep_vs_rule')} | {_plan(r['findep']['plan'])} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: pathlib.Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(dict.fromkeys(r["setting"] for r in out["prefill"]))
    short = {"deepseek-v2": "DSv2", "qwen3-30b-a3b": "Qwen3-30B"}
    names = [f"{tb}\n{short.get(model, model)}" for tb, model, _ in (k.split("_") for k in keys)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    x = np.arange(len(keys))

    def bars(ax, rows, series, key, title):
        width = 0.8 / len(series)
        for i, (label, pick) in enumerate(series):
            ys = [next((r.get(key, np.nan) for r in rows if r["setting"] == k and pick(r)), np.nan) for k in keys]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_ylim(bottom=0.9)
        ax.set_xticks(x, names, fontsize=6)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(axis="y", linewidth=0.3)

    bars(axes[0], out["prefill"], [(f"b={b}", lambda r, b=b: r["b"] == b and r["seq_len"] == args.seq_len)
                                   for b in args.batches] + [(f"b={b}, S={S}", lambda r, b=b, S=S: r["b"] == b
                                                              and r["seq_len"] == S)
                                                             for S in args.other_seq_lens[-1:] for b in (1, 2)],
         "findep_vs_pppipe", f"prefill, fixed b (S={args.seq_len} unless noted): FinDEP / tuned PPPipe")
    axes[0].set_ylabel("speedup (step-time ratio)")
    ctx = args.contexts[0]
    bars(axes[1], out["decode"], [(f"b={b}", lambda r, b=b: r["context"] == ctx and r["b"] == b)
                                  for b in args.decode_batches] + [("b=max", lambda r: r["context"] == ctx
                                                                    and r["memory_max"])],
         "findep_vs_rule", f"decode @{ctx}: FinDEP / ping-pong rule (FinDEP = tuned PPPipe here)")
    b0 = args.skew_batches[0]
    bars(axes[2], out["skew"], [(f"zipf {z}", lambda r, z=z: r["zipf"] == z and r["workload"] == "prefill"
                                 and r["b"] == b0) for z in args.zipf], "findep_vs_pppipe",
         f"skewed routing, prefill {args.seq_len}, b={b0}: FinDEP / tuned PPPipe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024, help="prompt tokens (prefill, TTFT and skew rows)")
    parser.add_argument("--other-seq-lens", type=int, nargs="*", default=[256, 4096],
                        help="more prompt lengths for the fixed-batch prefill rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="prefill b")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="TTFT budgets (s)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192], help="decode: cached tokens")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[16, 64, 256], help="decode b")
    parser.add_argument("--zipf", type=float, nargs="+", default=[0.0, 0.8, 1.2], help="skew: Zipf exponents")
    parser.add_argument("--skew-batches", type=int, nargs="+", default=[1, 2, 8], help="skew: prefill b")
    parser.add_argument("--skew-decode-batch", type=int, default=64, help="skew: decode b (first context)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "scripts" / "results")
    parser.add_argument("--quick", action="store_true", help="two settings, fewer rows (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.budgets, args.contexts, args.decode_batches = [1, 2], [0.5], [1024], [16]
        args.zipf, args.skew_batches, args.other_seq_lens = [0.0, 1.2], [1], []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS[2:4] if args.quick else SETTINGS
    started = time.perf_counter()
    out = run(settings, args)
    out.update(seconds=time.perf_counter() - started,
               arguments={k: v for k, v in vars(args).items() if k != "out_dir"},
               assumptions={
                   "batch": "b sequences per attention device, r1 micro-batches of ceil(b / r1), padded as "
                            "DEPRuntime.prefill pads; no micro-batch all padding, no empty token segment",
                   "plans": "exhaustive over each schedule's space with the exact fast step time on the cost "
                            "models (epsjax/dep/workloads.py)",
                   "ttft": "the step's makespan (the last sequence's first token) <= the budget",
                   "rule": "MegaScale-Infer (arXiv:2504.02263): smallest m with m >= 2 (1 + T_c / T_f), T_f = "
                           "max(attention + shared + combine, expert FFN), T_c = max(A2E, E2A) per micro-batch",
                   "routing": "uniform unless zipf; Zipf shares shuffled over experts (seed 0), no hot-expert "
                              "replicas", "memory": "90% of device memory usable; weights at most 75% of it"})
    (args.out_dir / "findep_workloads.json").write_text(json.dumps(out, indent=1) + "\n")
    text = tables(out, args)
    (args.out_dir / "findep_workloads.md").write_text(text)
    plot(out, args.out_dir / "findep_workloads.png", args)
    print(text)
    print(f"{out['seconds']:.1f} s; wrote {args.out_dir}/findep_workloads.{{json,md,png}}")
    return out


if __name__ == "__main__":
    main()
