#!/usr/bin/env python3
"""Wall time of the README's first command, `epsjax generate --devices 8`, from two checkouts' venvs, alternating.

For each cache mode and repeat, runs ROOT/.venv/bin/epsjax generate --devices 8 [extra args] from the before and
the after checkout (before, after, then after, before, ...) and records, from the start of the process:
the time to its first line on stdout (the "model ..." line, after imports, model build and planning), the time to
the "compile ..." line (first request done), and the total wall time; also the compile line's own numbers and the
reported prefill / decode tokens/s. Reported as min / median / max over the repeats.

Cache modes (JAX's persistent compilation cache, which `epsjax generate` turns on by default):
  cold: a fresh empty cache directory for every run (a first-ever run of the README command: compiles, writes);
  warm: one cache directory per checkout, filled by one untimed run first (every later run of the command);
  off:  --no-compile-cache.

    python3 scripts/bench_checkouts_startup.py --before ../epsjax-before --after .            # cold,warm x 3
    python3 scripts/bench_checkouts_startup.py --before ../epsjax-before --after . --modes off --repeats 1                                # a smoke test

stdlib only. Each run's stdout and stderr go to --out-dir; a failed run prints its stderr tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree_state(root: Path) -> str:
    def sh(args):
        try:
            return subprocess.run(args, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    head = sh(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return "not-git"
    return head + ("+dirty" if sh(["git", "status", "--porcelain", "--untracked-files=no"]) else "")


def run_once(root: Path, mode: str, cache_dir: Path | None, extra: list[str], log_stem: Path, timeout: float) -> dict:
    cmd = [str(root / ".venv" / "bin" / "epsjax"), "generate", "--devices", "8"]
    if mode == "off":
        cmd.append("--no-compile-cache")
    else:
        cmd += ["--compile-cache", str(cache_dir)]
    cmd += extra
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("EPSJAX_COMPILATION_CACHE", None)
    env.pop("XLA_FLAGS", None)
    err_path = log_stem.with_suffix(".stderr")
    lines = []
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
    total = time.perf_counter() - t0
    log_stem.with_suffix(".stdout").write_text("".join(f"{t:8.2f}  {s}\n" for t, s in lines))
    rec = {"root": str(root), "mode": mode, "rc": rc, "cmd": cmd, "total_s": round(total, 2),
           "first_line_s": round(lines[0][0], 2) if lines else None, "first_line": lines[0][1] if lines else None,
           "stderr": str(err_path)}
    for t, s in lines:
        if s.startswith("compile"):
            rec["compile_line_s"] = round(t, 2)
            m = re.search(r"(\d+) programs in ([\d.]+) s of ([\d.]+) s.*?(\d+) loaded", s)
            if m:
                rec.update(programs=int(m[1]), compile_s=float(m[2]), first_request_s=float(m[3]),
                           cache_hits=int(m[4]))
        elif s.startswith("prefill") or s.startswith("decode"):
            m = re.search(r"([\d,.]+) tokens/s", s)
            if m:
                rec[s.split()[0] + "_tok_s"] = float(m[1].replace(",", ""))
    return rec


def spread(xs, fmt: str = ".2f") -> str:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return "n/a" if not xs else " / ".join(format(v, fmt) for v in (min(xs), statistics.median(xs), max(xs)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout with its own .venv (git worktree add ..)")
    p.add_argument("--after", type=Path, required=True, help="a checkout with its own .venv")
    p.add_argument("--modes", default="cold,warm", help="comma list of cold, warm, off")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out-dir", type=Path, default=None, help="default /tmp/epsjax-startup-<time>")
    p.add_argument("extra", nargs="*", help="after --: more arguments for epsjax generate")
    args = p.parse_args()
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, root in roots.items():
        if not (root / ".venv" / "bin" / "epsjax").exists():
            sys.exit(f"{side}: no {root}/.venv/bin/epsjax (pip install -e . in that venv)")
    modes = args.modes.split(",")
    if set(modes) - {"cold", "warm", "off"}:
        sys.exit(f"--modes: cold, warm, off; got {args.modes}")
    out_dir = args.out_dir or Path("/tmp") / time.strftime("epsjax-startup-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="epsjax-startup-cache-"))
    print(f"before {roots['before']} @ {tree_state(roots['before'])}; after {roots['after']} @ "
          f"{tree_state(roots['after'])}; results in {out_dir}", flush=True)
    records = []
    failed = False
    try:
        for mode in modes:
            if mode == "warm":
                for side, root in roots.items():
                    print(f"[{time.strftime('%H:%M:%S')}] warm: filling {side}'s cache (untimed) ...", end="",
                          flush=True)
                    r = run_once(root, "warm", scratch / f"warm-{side}", args.extra, out_dir / f"warm_{side}_fill",
                                 args.timeout)
                    print(f" {r['total_s']:.0f} s, rc {r['rc']}", flush=True)
            for rep in range(args.repeats):
                for side in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                    cache = (scratch / f"cold-{side}-{rep}") if mode == "cold" else scratch / f"warm-{side}"
                    load = os.getloadavg()
                    print(f"[{time.strftime('%H:%M:%S')}] {mode} {side:6s} rep {rep} (loadavg {load[0]:.2f}) ...",
                          end="", flush=True)
                    r = run_once(roots[side], mode, cache, args.extra, out_dir / f"{mode}_{side}_rep{rep}",
                                 args.timeout)
                    r.update(side=side, rep=rep, tree=tree_state(roots[side]), loadavg=load)
                    records.append(r)
                    print(f" first line {r['first_line_s']} s, compile line {r.get('compile_line_s')} s, total "
                          f"{r['total_s']:.1f} s, rc {r['rc']}", flush=True)
                    if r["rc"] != 0:
                        failed = True
                        err = Path(r["stderr"]).read_text(errors="replace").splitlines()[-30:]
                        print("  FAILED; stderr tail:\n" + "\n".join("    " + s for s in err), flush=True)
                    if mode == "cold":
                        shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        (out_dir / "runs.json").write_text(json.dumps(records, indent=1))

    lines = [f"before {roots['before']} @ {tree_state(roots['before'])}; after {roots['after']} @ "
             f"{tree_state(roots['after'])}", "min / median / max seconds over the repeats (rc 0 runs only)", "",
             "mode | side | runs | first stdout line s | compile line s | total s | programs compiled / cache hits "
             "| compile s (reported) | prefill tok/s | decode tok/s",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for mode in modes:
        for side in ("before", "after"):
            rs = [r for r in records if r["mode"] == mode and r["side"] == side and r["rc"] == 0]
            lines.append(
                f"{mode} | {side} | {len(rs)} | {spread([r['first_line_s'] for r in rs])} | "
                f"{spread([r.get('compile_line_s') for r in rs])} | {spread([r['total_s'] for r in rs])} | "
                f"{','.join(str(r.get('programs')) for r in rs)} / {','.join(str(r.get('cache_hits')) for r in rs)} | "
                f"{spread([r.get('compile_s') for r in rs])} | {spread([r.get('prefill_tok_s') for r in rs], ',.0f')} | "
                f"{spread([r.get('decode_tok_s') for r in rs], ',.0f')}")
        b = [r["total_s"] for r in records if r["mode"] == mode and r["side"] == "before" and r["rc"] == 0]
        a = [r["total_s"] for r in records if r["mode"] == mode and r["side"] == "after" and r["rc"] == 0]
        if a and b:
            lines.append(f"{mode} | after/before total (medians) | | | | "
                         f"{statistics.median(a) / statistics.median(b):.3f} | | | |")
    text = "\n".join(lines)
    (out_dir / "summary.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwrote {out_dir}/summary.md, runs.json, and each run's .stdout (timestamped) and .stderr")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
