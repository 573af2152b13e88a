"""Benchmark expert offloading: every mode of epsjax.offload at several device budgets for the routed experts.

    .venv/bin/python scripts/bench_offload.py --preset tiny-mixtral --override num_layers=4 \
        --override num_experts=16 --override expert_ffn_dim=128 \
        --predictor scripts/results/predictor_tiny-mixtral-L4E16 --out scripts/results/offload_tiny-mixtral-L4E16_cpu

For each budget (a fraction of all routed-expert bytes) and mode (device = all experts on the device, the upper
bound; on_demand = no cache; lru = LRU cache without prediction; expertflow = predictor + PLEC + predictor-aware
eviction + priority misses) it runs greedy generation of a batch of held-out prompts (a compile warm-up on other
prompts first) and records prefill and decode tokens/s, the cache hit ratio, bytes moved host -> device, the
cache's peak device bytes (its own accounting: pool + staging), the device's own peak memory (memory_stats() where
the platform has it; on CPU, the live device arrays the engine added, sampled at every grouped-FFN wave in an
extra untimed run) and whether the tokens equal the all-on-device run's. Also:

  * overlap: host -> device copies of experts alone, grouped-FFN compute alone, and both issued together;
  * token scheduler: distinct experts per batch (summed over layers) for arrival order vs form_batches on held-out
    routing traces, and split_two's time; and a two-batch decode with and without regrouping.

Writes OUT.json and OUT.png (tokens/s and hit ratio against budget). The platform is recorded in the JSON and the
plot title: numbers from a CPU run say nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np

from epsjax.host_memory import keep_freed_memory
from epsjax.offload import scheduler, traces
from epsjax.offload.predictor import PredictorConfig, RoutingPredictor, routing_targets, train_predictor
from epsjax.offload.runtime import OffloadConfig, OffloadEngine, _experts, expert_bytes
from epsjax.offload.store import memory_kinds


def live_device_bytes(device) -> int:
    return sum(a.nbytes for a in jax.live_arrays() if a.sharding.memory_kind in (None, "device")
               and device in a.devices())


def device_peak(device) -> int | None:
    stats = device.memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def measure(model, configs, predictor, warm_prompts, prompts, new_tokens, device, repeats):
    """Builds and warms (compiles) an engine per config, then times them round-robin, `repeats` rounds, so that
    load from other processes falls on every mode alike. The cache stays warm between rounds, as in serving;
    cache statistics are the last round's. Returns a row per config and each config's generated tokens."""
    engines = []
    for config in configs:
        engine = OffloadEngine(model, config, predictor=predictor if config.mode == "expertflow" else None)
        engine.generate(warm_prompts, max_new_tokens=new_tokens)  # compile every shape
        engines.append(engine)
    peak_before = device_peak(device)
    runs = [[] for _ in engines]
    for _ in range(repeats):
        for engine, results in zip(engines, runs):
            engine.cache.reset_stats()
            results.append(engine.generate(prompts, max_new_tokens=new_tokens))
    rows = []
    for config, engine, results in zip(configs, engines, runs):
        stats = engine.cache.stats.as_dict()
        median = lambda f: float(np.median([f(r) for r in results]))
        rows.append({
            "mode": config.mode, "policy": engine.cache.policy.name, "budget_fraction": config.budget_fraction,
            "budget_bytes": config.budget(engine.store.total_bytes), "slots": engine.cache.num_slots,
            "prefill_tokens_per_s": median(lambda r: r.prefill_tokens_per_s),
            "decode_tokens_per_s": median(lambda r: r.decode_tokens_per_s),
            "decode_tokens_per_s_all": [r.decode_tokens_per_s for r in results],
            "prefill_seconds": median(lambda r: r.prefill_seconds),
            "decode_seconds": median(lambda r: r.decode_seconds),
            "hit_ratio": stats["hit_ratio"], "late_or_hit_ratio": (stats["hits"] + stats["late"]) / stats["accesses"],
            "bytes_h2d": stats["bytes_h2d"], "cache": stats, "cache_peak_device_bytes": stats["peak_device_bytes"],
            "device_peak_bytes_in_use": device_peak(device), "device_peak_bytes_before": peak_before,
            "live_device_bytes_added_peak": live_bytes_added(engine, prompts, new_tokens, device),
        })
    return rows, [results[-1].tokens for results in runs]


def live_bytes_added(engine, prompts, new_tokens, device) -> int:
    """Untimed: the most device bytes the engine holds beyond the model's own parameters (pool, staging buffers,
    KV cache, activations), from jax.live_arrays() at every grouped-FFN wave of one more generation."""
    base = live_device_bytes(device) - sum(int(w.nbytes) for w in engine.cache.transfers.pool)
    peak = [0]
    demand = engine.cache.demand

    def sampled(layer, experts):
        for table in demand(layer, experts):
            peak[0] = max(peak[0], live_device_bytes(device) - base)
            yield table

    engine.cache.demand = sampled
    engine.generate(prompts, max_new_tokens=new_tokens)
    engine.cache.demand = demand
    return peak[0]


def overlap_probe(model, device, *, num_experts: int = 32, reps: int = 20):
    """Times host -> device copies of experts, the grouped FFN, and both issued together."""
    engine = OffloadEngine(model, OffloadConfig(mode="device"))
    store = engine.store
    keys = [(i // store.num_experts % store.num_layers, i % store.num_experts) for i in range(num_experts)]
    pool = engine.cache.transfers.pool
    M = 256
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((M, store.d_model)).astype(store.dtype), device)
    sizes = np.full(store.num_experts, M // store.num_experts, np.int32)
    sizes[0] += M - sizes.sum()
    group_sizes = jax.device_put(sizes, device)
    slots = jax.device_put(np.arange(store.num_experts, dtype=np.int32), device)
    backend, tiling = engine._backend(M)

    def compute():
        y = x
        for _ in range(reps):
            y = _experts(x, group_sizes, *pool, slots, y, backend=backend, tiling=tiling, accumulate=True)
        return y

    def copy():
        return [store.fetch(k) for k in keys]

    jax.block_until_ready((compute(), copy()))
    timings = {}
    for name, fn in (("copy", copy), ("compute", compute), ("both", lambda: (copy(), compute()))):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    serial = timings["copy"] + timings["compute"]
    hidden = (serial - timings["both"]) / min(timings["copy"], timings["compute"])
    return {"experts_copied": num_experts, "bytes_copied": num_experts * store.bytes_per_expert,
            "ffn_calls": reps, "rows": M, "seconds": timings, "overlapped_fraction_of_shorter": hidden,
            "host_memory_kind": store.memory_kind}


def scheduler_section(model, predictor, ids_test, tokens_test, warm, new_tokens):
    E = model.cfg.num_experts
    out = {"form_batches": {}, "decode_pair": {}}
    for batch in (4, 8, 16):
        before, after, seconds = [], [], []
        for t in range(8, ids_test.shape[1], 8):
            paths = routing_targets(ids_test[:, t], E).reshape(len(ids_test), -1).astype(bool)
            n = (len(paths) // (2 * batch)) * 2 * batch
            paths = paths[:n]
            arrival = [np.arange(s, s + batch) for s in range(0, n, batch)]
            before.append(scheduler.union_cost(paths, arrival) / len(arrival))
            after.append(scheduler.union_cost(paths, scheduler.form_batches(paths, batch)) / len(arrival))
            seconds.extend(scheduler.timed_split(paths[:2 * batch])[2] for _ in range(3))
        out["form_batches"][batch] = {
            "experts_per_batch_arrival": float(np.mean(before)), "experts_per_batch_scheduled": float(np.mean(after)),
            "reduction": 1 - float(np.mean(after)) / float(np.mean(before)),
            "split_two_ms_median": 1e3 * float(np.median(seconds)), "split_two_ms_max": 1e3 * float(np.max(seconds))}
    engine = OffloadEngine(model, OffloadConfig(mode="expertflow", budget_fraction=0.25), predictor=predictor)
    prompts = [np.asarray(tokens_test[i, :16]) for i in range(8)]
    for regroup in (False, True):  # compile every shape first
        scheduler.generate_two_batches(engine, [np.asarray(w[:16]) for w in warm[:8]], max_new_tokens=new_tokens,
                                       regroup=regroup)
    for regroup in (False, True):
        engine.cache.reset_stats()
        start = time.perf_counter()
        result, log = scheduler.generate_two_batches(engine, prompts, max_new_tokens=new_tokens, regroup=regroup)
        out["decode_pair"]["regrouped" if regroup else "fixed"] = {
            "distinct_experts_per_batch_step": float(np.mean(log["distinct_experts"])),
            "hit_ratio": engine.cache.stats.hit_ratio, "bytes_h2d": engine.cache.stats.bytes_h2d,
            "seconds": time.perf_counter() - start, "tokens": result.tokens,
            "split_two_ms_median": 1e3 * float(np.median(log["split_seconds"])) if log["split_seconds"] else None}
    pair = out["decode_pair"]
    pair["same_tokens"] = pair["fixed"]["tokens"] == pair["regrouped"]["tokens"]
    return out


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    device = next(r for r in rows if r["mode"] == "device")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in (("on_demand", "s"), ("lru", "o"), ("expertflow", "^")):
        sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["budget_fraction"])
        budgets = [100 * r["budget_fraction"] for r in sel]
        ax1.plot(budgets, [r["decode_tokens_per_s"] for r in sel], marker=marker, label=mode)
        ax2.plot(budgets, [r["hit_ratio"] for r in sel], marker=marker, label=mode)
    ax1.axhline(device["decode_tokens_per_s"], color="k", ls="--", label="all on device")
    ax1.set(xlabel="expert budget (% of routed-expert bytes)", ylabel="decode tokens/s", ylim=(0, None))
    ax2.set(xlabel="expert budget (% of routed-expert bytes)", ylabel="cache hit ratio", ylim=(0, 1.02))
    ax1.legend()
    ax2.legend()
    m, w = report["model"], report["workload"]
    where = report["platform"] if report["measured_on_gpu"] else (
        f"CPU ({report['cpu_count']} cores, shared machine): NOT a GPU measurement")
    fig.suptitle(f"{m['name']} ({m['moe_layers']} MoE layers x {m['num_experts']} experts, top-{m['top_k']}), "
                 f"batch {w['batch_size']}, {w['prompt_len']}-token prompts, {w['new_tokens']} new tokens\n{where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint")
    p.add_argument("--predictor", help="a saved RoutingPredictor; default: collect traces and train one here")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--modes", nargs="+", default=["on_demand", "lru", "expertflow"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    overrides = traces.parse_overrides(args.override)
    model = traces.build_model(args.preset, overrides, seed=args.seed, checkpoint=args.checkpoint)
    cfg = model.cfg
    # Held-out workload: sequences of the same synthetic language (chain 0) that the predictor's traces (samples
    # seed 0) never saw (samples seed 1).
    corpus = traces.synthetic_corpus(cfg.vocab_size, 256, 64, seed=1, chain_seed=0)
    B, T = args.batch_size, args.prompt_len
    prompts = [corpus[i, :T].tolist() for i in range(B)]
    warm = [corpus[i, :T].tolist() for i in range(B, 2 * B + 8)]
    tracer = OffloadEngine(model, OffloadConfig(mode="device"), record_routing=True)
    ids_test = traces.collect_traces(tracer, corpus[64:], batch_size=64)
    del tracer
    if args.predictor:
        predictor = RoutingPredictor.load(args.predictor)
    else:
        train_tokens = traces.synthetic_corpus(cfg.vocab_size, 512, 64, seed=0, chain_seed=0)
        tracer = OffloadEngine(model, OffloadConfig(mode="device"), record_routing=True)
        predictor, _ = train_predictor(train_tokens, traces.collect_traces(tracer, train_tokens, batch_size=64),
                                       PredictorConfig.for_model(cfg), steps=400)

    configs = [OffloadConfig(mode="device")] + [OffloadConfig(mode=mode, budget_fraction=fraction)
                                                for fraction in args.budgets for mode in args.modes]
    load_before = os.getloadavg()
    results, tokens = measure(model, configs, predictor, warm[:B], prompts, args.new_tokens, device, args.repeats)
    load_after = os.getloadavg()
    for row, toks in zip(results, tokens):
        row["tokens_equal_device_run"] = toks == tokens[0]
        budget = "100%" if row["mode"] == "device" else f"{row['budget_fraction']:4.0%}"
        print(f"{row['mode']:>10} @ {budget}: {row['slots']:3d} slots  decode {row['decode_tokens_per_s']:8.1f} "
              f"tok/s  prefill {row['prefill_tokens_per_s']:8.1f} tok/s  hit {row['hit_ratio']:.3f}  "
              f"H2D {row['bytes_h2d'] / 2**20:7.2f} MiB  same tokens {row['tokens_equal_device_run']}")
    report = {
        "platform": f"{device.platform} ({device.device_kind}), {jax.local_device_count()} local devices",
        "measured_on_gpu": device.platform == "gpu",
        "note": None if device.platform == "gpu" else (
            f"measured on {device.platform}, not a GPU: transfers are host memcpys and compete with compute for the "
            "same cores; tokens/s here say nothing about GPU offloading, which was not measured"),
        "memory_kinds": memory_kinds(device), "jax": jax.__version__, "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "model": {"name": cfg.name, "preset": args.preset, "overrides": overrides, "seed": args.seed,
                  "checkpoint": args.checkpoint, "moe_layers": len(cfg.moe_layers), "num_experts": cfg.num_experts,
                  "top_k": cfg.router.top_k, "expert_bytes_total": expert_bytes(cfg),
                  "bytes_per_expert": expert_bytes(cfg) // (len(cfg.moe_layers) * cfg.num_experts)},
        "workload": {"batch_size": B, "prompt_len": T, "new_tokens": args.new_tokens, "corpus_seed": 1,
                     "chain_seed": 0, "repeats": args.repeats, "timing": "median over round-robin repeats",
                     "predictor": args.predictor or "trained in-process on corpus seed 0"},
        "results": results,
        "overlap": overlap_probe(model, device),
        "token_scheduler": scheduler_section(model, predictor, ids_test, corpus[64:], warm, args.new_tokens),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"overlap": report["overlap"], "token_scheduler": {
        "form_batches": report["token_scheduler"]["form_batches"],
        "decode_pair": {k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "tokens"})
                        for k, v in report["token_scheduler"]["decode_pair"].items()}}}, indent=1, default=float))
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
