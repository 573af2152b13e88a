#!/usr/bin/env python3
"""epsjax "before" vs "after" (two checkouts, each with its own .venv) against transformers, in one run.

Each run is one checkout's own scripts/bench_vs_transformers.py (which already alternates epsjax and the
transformers worker in one process, float32, greedy), with the same arguments; the checkouts alternate
(before, after, then after, before, ...) `--repeats` times. Each run writes its JSON into --out-dir (never into a
checkout's scripts/results/). Then a table: per family x batch x prompt and phase (prefill, decode), epsjax
tokens/s before and after, after/before (run i's after over run i's before), and each side's epsjax/transformers
ratio (both measured in the same process), as min / median / max over the repeats. Each run's own number is the
median of its inner `--inner-repeats` timings (bench_vs_transformers' --repeats).

    python3 scripts/bench_checkouts_vs_transformers.py --before ../epsjax-before --after . \
        --peer-python /tmp/peer311/bin/python

stdlib only; any python3 runs it. The checkpoints (random, written once by transformers, shared by both sides)
are made before the first timed run if --checkpoints lacks them. `--summarize OUT_DIR` re-tabulates a finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("prefill", "decode")


def sh(args, cwd) -> str:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def tree_state(root: Path) -> str:
    """HEAD plus a short hash of the uncommitted diff of tracked files (to notice a tree that changes mid-run)."""
    head = sh(["git", "rev-parse", "--short", "HEAD"], root)
    if head == "?":
        return "not-git"
    diff = sh(["git", "diff", "HEAD"], root)
    return head + (f"+dirty:{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else "")


def venv_python(root: Path) -> Path:
    return root / ".venv" / "bin" / "python"


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    # tqdm writes carriage-return updates; keep the last state of each line
    return "\n".join(line.split("\r")[-1] for line in lines[-n:])


def make_checkpoints(peer_python: str, roots: list[Path], families: list[str], directory: Path) -> None:
    missing = [f for f in families if not (directory / f"{f}-bench" / "config.json").exists()]
    if not missing:
        return
    worker = next((r / "scripts" / "peer_transformers.py" for r in roots
                   if (r / "scripts" / "peer_transformers.py").exists()), None)
    if worker is None:
        sys.exit("no scripts/peer_transformers.py in either checkout")
    requests = "".join(json.dumps({"cmd": "make_checkpoint", "family": f, "path": str(directory / f"{f}-bench")})
                       + "\n" for f in missing) + json.dumps({"cmd": "quit"}) + "\n"
    print(f"writing random checkpoints {missing} to {directory} (transformers, untimed) ...", flush=True)
    t = time.perf_counter()
    out = subprocess.run([peer_python, str(worker)], input=requests, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if "error" in line:
            sys.exit(f"checkpoint writing failed: {line}\n{out.stderr[-3000:]}")
    if out.returncode:
        sys.exit(f"checkpoint writing failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)


def run_one(side: str, root: Path, rep: int, args, out_dir: Path) -> dict:
    out = out_dir / f"{side}_rep{rep}.json"
    log = out_dir / f"{side}_rep{rep}.log"
    state = tree_state(root)
    cmd = [str(venv_python(root)), str(root / "scripts" / "bench_vs_transformers.py"),
           "--peer-python", args.peer_python, "--families", args.families, "--batches", args.batches,
           "--prompt-lens", args.prompt_lens, "--decode-steps", str(args.decode_steps),
           "--repeats", str(args.inner_repeats), "--checkpoints", str(args.checkpoints), "--out", str(out),
           "--label", f"{side} rep {rep} ({state})"] + args.extra
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    load = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] {side:6s} rep {rep}: {root} @ {state}, loadavg "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ...", end="", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t
    print(f" {wall:.0f} s, rc {rc}", flush=True)
    record = {"side": side, "rep": rep, "root": str(root), "tree": state, "tree_after": tree_state(root),
              "rc": rc, "wall_s": round(wall, 1), "json": str(out), "log": str(log), "cmd": cmd}
    if record["tree_after"] != state:
        print(f"  WARNING: {root} changed during the run ({state} -> {record['tree_after']})", flush=True)
    if rc != 0 or not out.exists():
        print(f"  FAILED ({side}, rc {rc}); last lines of {log}:\n" + "\n".join(
            "    " + line for line in tail(log).splitlines()), flush=True)
        record["ok"] = False
    else:
        data = json.loads(out.read_text())
        record["ok"] = "load_after" in data   # written at the very end: the run finished every point
        if not record["ok"]:
            print(f"  INCOMPLETE results in {out}; last lines of {log}:\n{tail(log)}", flush=True)
    return record


def stats(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def median_tps(point: dict, phase: str, who: str) -> float:
    return point[phase][f"{who}_tokens_per_s"]["median"]


def summarize(out_dir: Path) -> str:
    runs = json.loads((out_dir / "runs.json").read_text())
    by_side: dict[str, dict[int, dict]] = {"before": {}, "after": {}}
    for r in runs["runs"]:
        p = Path(r["json"])
        if p.exists():
            data = json.loads(p.read_text())
            by_side[r["side"]][r["rep"]] = data
    keys = []  # (family, batch, prompt_len) in order of appearance
    for side in ("after", "before"):
        for data in by_side[side].values():
            for fam, fd in data["families"].items():
                for pt in fd["points"]:
                    k = (fam, pt["batch"], pt["prompt_len"])
                    if k not in keys:
                        keys.append(k)

    def point(side, rep, k):
        data = by_side[side].get(rep)
        if not data or k[0] not in data["families"]:
            return None
        return next((pt for pt in data["families"][k[0]]["points"]
                     if (pt["batch"], pt["prompt_len"]) == k[1:]), None)

    reps = sorted(set(by_side["before"]) | set(by_side["after"]))
    lines = [f"before: {runs['before']}   after: {runs['after']}",
             f"each cell: min / median / max over {len(reps)} repeats (each repeat: median of "
             f"{runs['args']['inner_repeats']} inner timings); tok/s; ratios to transformers from the same process",
             "",
             "family | BxT | phase | before epsjax tok/s | after epsjax tok/s | after/before | before/transformers "
             "| after/transformers | transformers tok/s (before runs; after runs) | greedy tokens",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for k in keys:
        for phase in PHASES:
            b = [point("before", r, k) for r in reps]
            a = [point("after", r, k) for r in reps]
            b_tps = [median_tps(p, phase, "epsjax") if p else None for p in b]
            a_tps = [median_tps(p, phase, "epsjax") if p else None for p in a]
            pair = [y / x for x, y in zip(b_tps, a_tps) if x and y]
            b_ratio = [p[phase]["ratio_median"] if p else None for p in b]
            a_ratio = [p[phase]["ratio_median"] if p else None for p in a]
            tb = [median_tps(p, phase, "transformers") if p else None for p in b]
            ta = [median_tps(p, phase, "transformers") if p else None for p in a]
            match = []
            for side, pts in (("before", b), ("after", a)):
                bad = [p for p in pts if p and (p["greedy_sequences_mismatched"] or not p["prefill_next_tokens_match"])]
                if bad:
                    match.append(f"{side}: {len(bad)} run(s) differ")
            lines.append(f"{k[0]} | {k[1]}x{k[2]} | {phase} | {stats(b_tps)} | {stats(a_tps)} | **{stats(pair)}** | "
                         f"{stats(b_ratio)} | {stats(a_ratio)} | {stats(tb)}; {stats(ta)} | "
                         f"{'; '.join(match) or 'match'}")
    lines.append("")
    for r in runs["runs"]:
        data = by_side[r["side"]].get(r["rep"], {})
        lb, la = data.get("load_before", {}), data.get("load_after", {})
        lines.append(f"{r['side']:6s} rep {r['rep']}: rc {r['rc']}, {r['wall_s']:.0f} s, tree {r['tree']}"
                     f"{' -> ' + r['tree_after'] if r['tree_after'] != r['tree'] else ''}, commit in JSON "
                     f"{data.get('commit', '?')}, loadavg before {fmt_load(lb)} after {fmt_load(la)}")
    return "\n".join(lines)


def fmt_load(d: dict) -> str:
    la = d.get("loadavg")
    return "?" if la is None else f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} (busy {d.get('busy_fraction', '?')})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout with its own .venv (git worktree add ..)")
    p.add_argument("--after", type=Path, required=True, help="a checkout with its own .venv")
    p.add_argument("--peer-python", default="/tmp/peer311/bin/python")
    p.add_argument("--families", default="mixtral,qwen3_moe")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-lens", default="256")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="runs per checkout, alternating the checkouts")
    p.add_argument("--inner-repeats", type=int, default=3, help="bench_vs_transformers --repeats inside each run")
    p.add_argument("--checkpoints", type=Path, default=Path("/tmp/epsjax-bench-checkpoints"))
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default /tmp/epsjax-bench-<time>")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--summarize", type=Path, metavar="OUT_DIR", help="no run: tabulate a finished OUT_DIR")
    p.add_argument("extra", nargs="*", help="after --: more arguments for bench_vs_transformers.py")
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, root in roots.items():
        script = root / "scripts" / "bench_vs_transformers.py"
        if not script.exists() or not venv_python(root).exists():
            sys.exit(f"{side}: need {script} and {venv_python(root)}")
    if not Path(args.peer_python).exists():
        sys.exit(f"no peer python {args.peer_python}")
    out_dir = args.out_dir or Path("/tmp") / time.strftime("epsjax-bench-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    make_checkpoints(args.peer_python, [roots["after"], roots["before"]], args.families.split(","),
                     args.checkpoints)
    meta = {"before": f"{roots['before']} @ {tree_state(roots['before'])}",
            "after": f"{roots['after']} @ {tree_state(roots['after'])}",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "loadavg_start": os.getloadavg(), "runs": []}
    print(f"results in {out_dir}", flush=True)
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for side in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            meta["runs"].append(run_one(side, roots[side], rep, args, out_dir))
            (out_dir / "runs.json").write_text(json.dumps(meta, indent=1))
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    (out_dir / "runs.json").write_text(json.dumps(meta, indent=1))
    text = summarize(out_dir)
    (out_dir / "summary.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\ntotal {meta['total_s']:.0f} s; loadavg start {meta['loadavg_start']}, end {meta['loadavg_end']}; "
          f"wrote {out_dir}/summary.md, runs.json and each run's JSON and log")
    return 0 if all(r["ok"] for r in meta["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
