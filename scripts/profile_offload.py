"""Host overhead of the offload runtime's decode step, on this machine: where the Python time of one step goes.

    python scripts/profile_offload.py --checkpoint checkpoints/pystdlib-moe \
        --predictor scripts/results/expertflow_pystdlib_predictor --out scripts/results/offload_host_overhead_cpu

For each mode (lru, expertflow) at a 25% budget it decodes a batch of held-out-like prompts under cProfile and
reports per decode step: the wall time, and the host time inside the cache engine's bookkeeping (epsjax/offload/
cache.py and policies.py, waits on transfers excluded), the predictor (RoutingPredictor.expert_scores) and the
runtime's own per-layer glue. `--label` names the run (e.g. before / after a change) in OUT.json, so one file holds
both sides.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epsjax.checkpoint import load_checkpoint  # noqa: E402
from epsjax.host_memory import keep_freed_memory  # noqa: E402
from epsjax.offload import RoutingPredictor  # noqa: E402
from epsjax.offload.runtime import OffloadConfig, OffloadEngine  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402

CACHE_FILES = ("offload/cache.py", "offload/policies.py")


def host_seconds(stats: pstats.Stats) -> dict:
    """Own time (tottime) summed by where the code lives; transfer waits are not Python time (they block in
    jax), and sleeps in wait_until are subtracted."""
    out = {"cache_bookkeeping": 0.0, "predictor": 0.0, "runtime_glue": 0.0}
    for (file, _, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        if any(file.endswith(f) for f in CACHE_FILES):
            out["cache_bookkeeping"] += tottime
        elif file.endswith("offload/runtime.py"):
            out["runtime_glue"] += tottime
        if name == "expert_scores" and file.endswith("offload/predictor.py"):
            out["predictor"] += cumtime
    return out


def decode_steps(engine, prompts, steps: int):
    tokens, mask = engine.pad_prompts(prompts)
    logits, state, _ = engine.prefill(tokens, mask, cache_len=tokens.shape[1] + steps + 8)
    nxt = np.asarray(logits.argmax(-1), np.int32)
    for _ in range(steps):
        logits, state, _ = engine.decode_step(state, nxt)
        nxt = np.asarray(logits.argmax(-1), np.int32)
    return nxt


def main() -> int:
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/pystdlib-moe")
    p.add_argument("--predictor", default="scripts/results/expertflow_pystdlib_predictor")
    p.add_argument("--out", default="scripts/results/offload_host_overhead_cpu")
    p.add_argument("--label", default="after")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--budget", type=float, default=0.25)
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint, dtype="float32", progress=False)
    predictor = RoutingPredictor.load(args.predictor)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, model.cfg.vocab_size, 24).tolist() for _ in range(args.batch)]
    run = {"commit": git_commit(), "jax": jax.__version__, "platform": jax.devices()[0].device_kind,
           "batch": args.batch, "steps": args.steps, "budget": args.budget,
           "moe_layers": len(model.cfg.moe_layers), "experts": model.cfg.num_experts, "modes": {}}
    for mode in ("lru", "expertflow"):
        engine = OffloadEngine(model, OffloadConfig(mode=mode, budget_fraction=args.budget),
                               predictor=predictor if mode == "expertflow" else None)
        decode_steps(engine, prompts, args.steps)  # compile
        engine.cache.reset_stats()
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        decode_steps(engine, prompts, args.steps)
        profiler.disable()
        wall = time.perf_counter() - start
        host = host_seconds(pstats.Stats(profiler))
        per_step = {k: 1e3 * v / args.steps for k, v in host.items()}
        run["modes"][mode] = {"wall_ms_per_step_profiled": 1e3 * wall / args.steps,
                              **{f"{k}_ms_per_step": v for k, v in per_step.items()},
                              "hit_ratio": engine.stats.hit_ratio}
        # the same steps without the profiler, for the wall time
        start = time.perf_counter()
        decode_steps(engine, prompts, args.steps)
        run["modes"][mode]["wall_ms_per_step"] = 1e3 * (time.perf_counter() - start) / args.steps
        print(f"{mode:10s} {run['modes'][mode]['wall_ms_per_step']:.2f} ms/step; host: cache "
              f"{per_step['cache_bookkeeping']:.2f} ms, predictor {per_step['predictor']:.2f} ms, runtime glue "
              f"{per_step['runtime_glue']:.2f} ms", flush=True)
    out = Path(args.out).with_suffix(".json")
    report = json.loads(out.read_text()) if out.exists() else {}
    report[args.label] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} [{args.label}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
