"""Compilation under mixed traffic: programs compiled, latency and resident memory, before and after shape buckets,
and a process's cold vs warm start with the persistent compilation cache.

    .venv/bin/python scripts/bench_compilation.py [--requests 120] [--out scripts/results/compilation_cpu]

The workload (issue 18): one Engine on tiny-mixtral, `--requests` generate calls with random batch sizes 1-8,
prompt lengths 1-200 and max_new_tokens 1-40 (fixed seed). Each mode runs in its own process, so programs and
memory start from nothing:

  * unbucketed: Engine(buckets=None), exact batches, prompts padded to a multiple of 8 (the engine before);
  * bucketed: Engine() (ShapeBuckets: batches 1, 2, 4, 8, ..., lengths powers of two from 16);
  * warmed: bucketed, after Engine.warmup over every bucket the workload can reach (timed separately).

Per request it records seconds, programs compiled so far and resident memory (VmRSS). Then `epsjax generate`
runs twice against one fresh persistent-cache directory (cold, then warm) and once without the cache. Writes
OUT.json and OUT.png (programs and resident memory against requests, per mode).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BATCH, MAX_PROMPT, MAX_NEW = 8, 200, 40


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def workload(n: int, seed: int = 0, vocab: int = 256):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [([rng.integers(0, vocab, int(rng.integers(1, MAX_PROMPT + 1))).tolist()
              for _ in range(int(rng.integers(1, MAX_BATCH + 1)))], int(rng.integers(1, MAX_NEW + 1)))
            for _ in range(n)]


def worker(mode: str, n: int) -> dict:
    """One mode in this process: the workload's per-request seconds, programs and memory."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from flax import nnx

    from epsjax.compilation import CompileCounter, ShapeBuckets
    from epsjax.engine import Engine
    from epsjax.models import MoETransformer, get_preset

    cfg = get_preset("tiny-mixtral")
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    engine = Engine(model, buckets=None if mode == "unbucketed" else ShapeBuckets())
    out = {"mode": mode, "rss_start_mib": rss_mib()}
    seconds, programs, rss = [], [], []
    with CompileCounter() as counter:  # warm-up and traffic: programs counted from the engine's first call
        if mode == "warmed":
            start = time.perf_counter()
            records = engine.warmup(range(1, MAX_BATCH + 1), range(1, MAX_PROMPT + 1, 7),
                                    range(1, MAX_NEW + 1, 3), progress=True)
            out.update(warmup_seconds=time.perf_counter() - start, warmup_buckets=len(records),
                       warmup_programs=counter.programs, rss_after_warmup_mib=rss_mib())
        for prompts, new in workload(n):
            start = time.perf_counter()
            engine.generate(prompts, max_new_tokens=new)
            seconds.append(time.perf_counter() - start)
            programs.append(counter.programs)
            rss.append(rss_mib())
    out.update(seconds=seconds, programs=programs, rss_mib=rss, compile_seconds=counter.seconds,
               bound=ShapeBuckets().program_bound(MAX_PROMPT + MAX_NEW, MAX_BATCH))
    return out


def cli_start(cache: str | None) -> dict:
    """One `epsjax generate` process: wall seconds and its compile line."""
    cmd = [sys.executable, "-m", "epsjax.cli", "generate", "--preset", "tiny-mixtral", "--max-new-tokens", "16"]
    cmd += ["--compile-cache", cache] if cache else ["--no-compile-cache"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"epsjax generate failed: {done.stderr[-2000:]}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("compile")), "")
    return {"wall_seconds": wall, "compile_line": line.strip()}


def summarize(r: dict) -> dict:
    import numpy as np

    s = np.asarray(r["seconds"])
    return {"programs": r["programs"][-1], "first_20_requests_s": float(s[:20].sum()),
            "first_request_s": float(s[0]), "steady_median_ms": float(np.median(s[-40:]) * 1e3),
            "total_s": float(s.sum()), "rss_after_20_mib": r["rss_mib"][min(19, len(s) - 1)],
            "rss_end_mib": r["rss_mib"][-1], "compile_seconds": r["compile_seconds"],
            **({k: r[k] for k in ("warmup_seconds", "warmup_buckets", "warmup_programs", "rss_after_warmup_mib")}
               if r["mode"] == "warmed" else {})}


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = range(1, len(r["seconds"]) + 1)
        a.plot(x, r["programs"], label=r["mode"])
        b.plot(x, r["rss_mib"], label=r["mode"])
    a.set(xlabel="request", ylabel="programs compiled (cumulative)", title="programs")
    b.set(xlabel="request", ylabel="resident memory (MiB)", title="VmRSS")
    a.legend(), b.legend()
    fig.suptitle("tiny-mixtral, mixed requests (batch 1-8, prompt 1-200, new 1-40), CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from epsjax.host_memory import keep_freed_memory

    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "compilation_cpu"))
    parser.add_argument("--worker", choices=("unbucketed", "bucketed", "warmed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.requests)))
        return 0
    from epsjax.provenance import git_commit

    results = []
    for mode in ("unbucketed", "bucketed", "warmed"):
        print(f"running {mode} ({args.requests} requests) ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", mode, "--requests", str(args.requests)],
                              capture_output=True, text=True, cwd=ROOT, timeout=3600,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "EPSJAX_COMPILATION_CACHE": "off"})
        if done.returncode:
            raise SystemExit(f"{mode} failed: {done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    with tempfile.TemporaryDirectory() as cache:
        starts = {"no_cache": cli_start(None), "cold": cli_start(cache), "warm": cli_start(cache)}
    import jax

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": "cpu", "host": platform.node(), "jax": jax.__version__, "commit": git_commit(),
              "workload": {"model": "tiny-mixtral", "requests": args.requests, "batch": [1, MAX_BATCH],
                           "prompt": [1, MAX_PROMPT], "max_new_tokens": [1, MAX_NEW], "seed": 0},
              "modes": {r["mode"]: summarize(r) for r in results}, "process_start": starts,
              "bound": results[-1]["bound"], "raw": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"{'mode':12s} {'programs':>8s} {'first 20 req s':>14s} {'steady ms':>9s} {'RSS@20 MiB':>10s} "
          f"{'RSS end MiB':>11s}")
    for mode, s in report["modes"].items():
        print(f"{mode:12s} {s['programs']:8d} {s['first_20_requests_s']:14.1f} {s['steady_median_ms']:9.1f} "
              f"{s['rss_after_20_mib']:10.0f} {s['rss_end_mib']:11.0f}")
    if "warmup_seconds" in report["modes"]["warmed"]:
        w = report["modes"]["warmed"]
        print(f"warm-up: {w['warmup_buckets']} buckets, {w['warmup_programs']} programs in "
              f"{w['warmup_seconds']:.1f} s")
    print(f"bound (ShapeBuckets().program_bound({MAX_PROMPT + MAX_NEW}, {MAX_BATCH})): {report['bound']}")
    for name, s in starts.items():
        print(f"epsjax generate, {name:8s}: {s['wall_seconds']:.1f} s  ({s['compile_line']})")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
