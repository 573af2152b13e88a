"""Prefill throughput (tokens/s) of one model under each parallel strategy, on whatever devices exist.

Strategies (rows): TP+TP (attention and experts tensor-parallel), TP+EP and DP+EP without a pipeline, the
EPS-MoE pipeline with the scheduler's plan (epsjax.scheduler: pipeline degree, split, kernels; the default), and
the pipeline forced to each degree of --pipeline-degrees. Every strategy runs the same weights; the table also
reports each strategy's largest logit difference from the first one, as a check.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python scripts/bench_prefill.py --preset tiny-mixtral --batch 8 --seq 128
    .venv/bin/python scripts/bench_prefill.py --checkpoint /models/Mixtral-8x7B-v0.1 --batch 4 --seq 2048 \
        --profile /tmp/prefill-trace          # a jax.profiler trace of one prefill per strategy

--traffic (CPU) runs each EP strategy's prefill once more through the ragged transport (the real
jax.lax.ragged_all_to_all, lowered to sharding.ragged_emulation's emulation, which records what every receiver
gets) and reports the rows and bytes its dispatch and return moved per MoE layer, beside the (token, k)
assignments (what a per-assignment dispatch moves), the padded transport's static slots, and the minimum: the
distinct (token, device) pairs, which the unpipelined plan's dispatch moves.

Writes JSON (default scripts/results/bench_prefill_<model>_<devices>.json) and prints a table. --hlo prints,
for each EP strategy, the collective schedule of one MoE layer compiled alone (sharding/hlo_report.py): whether
the backend made the all-to-alls asynchronous and what it scheduled between start and done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Strategy:
    label: str
    rule_set: str
    pipeline_degree: int | None = 1  # None: the scheduler's plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default="tiny-mixtral", help="model preset (random weights, created in shards)")
    model.add_argument("--checkpoint", help="Hugging Face checkpoint directory (loaded into shards)")
    p.add_argument("--num-layers", type=int, help="override the preset's layer count (e.g. to fit a device)")
    p.add_argument("--dtype", help="parameter dtype (default: the preset's / config.json's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    p.add_argument("--pipeline-degrees", default="2,4",
                   help="EPS pipeline degrees to force, besides 1 and the scheduler's plan ('' for none)")
    p.add_argument("--hardware", help="the scheduler's hardware preset (default: from the jax device kind)")
    p.add_argument("--split", choices=("auto", "experts", "tokens"), default="auto",
                   help="pipeline stages by expert groups or token chunks (auto: experts when each device holds "
                        "enough experts)")
    p.add_argument("--strategies", default="tp,tp_ep,dp_ep", help="rule sets to run (tp, dp, tp_ep, dp_ep)")
    p.add_argument("--transport", default="auto", choices=("auto", "ragged", "padded"))
    p.add_argument("--traffic", action="store_true",
                   help="CPU: measure the rows each EP strategy's dispatch and return move (emulated ragged)")
    p.add_argument("--backend", default="auto", help="pallas_kernels backend of every stage")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="output JSON path")
    p.add_argument("--profile", help="write a jax.profiler trace of one prefill per strategy to this directory")
    p.add_argument("--hlo", action="store_true", help="print the MoE layer's collective schedule per EP strategy")
    return p.parse_args(argv)


def strategies(args) -> list[Strategy]:
    names = {"tp": "TP+TP", "dp": "DP+DP", "tp_ep": "TP+EP", "dp_ep": "DP+EP"}
    out = []
    for rule_set in args.strategies.split(","):
        if rule_set not in names:
            raise SystemExit(f"unknown strategy {rule_set!r}; choose from {', '.join(names)}")
        out.append(Strategy(names[rule_set], rule_set))
        if rule_set.endswith("_ep"):
            out.append(Strategy(f"EPS {names[rule_set]} (scheduler)", rule_set, None))
            for pn in (int(x) for x in args.pipeline_degrees.split(",") if x):
                out.append(Strategy(f"EPS {names[rule_set]}", rule_set, pn))
    return out


def main(argv=None) -> list[dict]:
    from epsjax.host_memory import keep_freed_memory

    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    args = parse_args(argv)
    import jax
    import numpy as np

    from epsjax import sharding
    from epsjax import placement
    from epsjax.engine import Engine
    from epsjax.models import get_preset

    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    if args.checkpoint:
        from epsjax.checkpoint import load_checkpoint, read_config

        cfg = read_config(args.checkpoint, dtype=args.dtype)
    else:
        overrides = {k: v for k, v in (("num_layers", args.num_layers), ("dtype", args.dtype)) if v}
        cfg = get_preset(args.preset, **overrides)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq

    rows, reference_logits = [], None
    models = {}
    for strategy in strategies(args):
        shape = placement.default_mesh_shape(strategy.rule_set, cfg, len(devices))
        mesh = sharding.make_mesh(**shape, devices=devices)
        batch_shards = math.prod(mesh.shape[a] for a in sharding.get_rules(strategy.rule_set).batch_axes)
        if args.batch % batch_shards:
            print(f"skip {strategy.label}: batch {args.batch} does not divide over {batch_shards} batch shards")
            continue
        if strategy.rule_set not in models:
            models.clear()  # one model on the devices at a time
            if args.checkpoint:
                models[strategy.rule_set] = load_checkpoint(
                    args.checkpoint, dtype=args.dtype,
                    shardings=placement.param_shardings(cfg, mesh, strategy.rule_set),
                    layout=placement.param_layout(cfg, mesh, strategy.rule_set), progress=False)
            else:
                models[strategy.rule_set] = placement.create_sharded_model(cfg, mesh, strategy.rule_set, 0)
        ep = math.prod(mesh.shape[a] for a in sharding.get_rules(strategy.rule_set).expert_axes)
        forced = None
        if strategy.pipeline_degree is not None:
            local_experts = -(-cfg.num_experts // ep)
            split = args.split if args.split != "auto" else (
                "experts" if strategy.pipeline_degree <= local_experts else "tokens")
            forced = sharding.ExpertPlan(strategy.pipeline_degree, split, backends=(args.backend,))
        experts, plan_source = placement.ep_experts(cfg, mesh, strategy.rule_set, batch=args.batch,
                                                    seq_len=args.seq, plan=forced, transport=args.transport,
                                                    hardware=args.hardware)
        plan = experts.plan
        engine = Engine(models[strategy.rule_set], experts=experts,
                        batch_sharding=sharding.batch_sharding(mesh, strategy.rule_set))

        start = time.perf_counter()
        logits, _, _ = engine.prefill(tokens, cache_len=args.seq)
        logits.block_until_ready()
        first_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.prefill(tokens, cache_len=args.seq)[0].block_until_ready()
            times.append(time.perf_counter() - start)
        if args.profile:
            with jax.profiler.trace(args.profile), jax.profiler.TraceAnnotation(
                    f"{strategy.label} PN={plan.pipeline_degree}"):
                engine.prefill(tokens, cache_len=args.seq)[0].block_until_ready()
        logits = np.asarray(logits, np.float32)
        reference_logits = logits if reference_logits is None else reference_logits
        median = statistics.median(times)
        rows.append(dict(
            strategy=strategy.label, rule_set=strategy.rule_set, mesh=shape, expert_parallel=ep,
            pipeline_degree=plan.pipeline_degree, split=plan.split if plan.pipeline_degree > 1 else "-",
            plan_source=plan_source, transport=experts.resolved_transport, backend=",".join(plan.backends),
            first_call_s=round(first_s, 3),
            median_s=median, min_s=min(times), tokens_per_s=n_tokens / median,
            max_logit_diff=float(np.abs(logits - reference_logits).max())))
        if args.traffic and strategy.rule_set.endswith("_ep"):
            rows[-1]["traffic"] = measure_traffic(cfg, mesh, strategy.rule_set, plan, engine, tokens, args.seq)
        if args.hlo and strategy.rule_set.endswith("_ep"):
            print(f"-- {strategy.label} PN={plan.pipeline_degree}: one MoE layer's collectives")
            print(moe_layer_report(cfg, mesh, experts, n_tokens))

    result = dict(model=cfg.name, dtype=cfg.dtype, batch=args.batch, seq=args.seq, devices=len(devices),
                  device_kind=devices[0].device_kind, platform=devices[0].platform, repeats=args.repeats,
                  rows=rows)
    out = Path(args.json or ROOT / "scripts" / "results" / f"bench_prefill_{cfg.name}_{len(devices)}"
                                                           f"{devices[0].platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}")
    return rows


def measure_traffic(cfg, mesh, rule_set, plan, engine, tokens, seq) -> dict:
    """Rows per MoE layer that one prefill's dispatches and returns deliver through the (emulated) ragged
    transport, summed over devices and stages, with bytes; and the same layer's (token, k) assignments and
    padded-slot rows."""
    import jax
    import numpy as np

    from epsjax import sharding
    from epsjax.sharding import ragged_emulation, transports

    record = []
    jax.clear_caches()  # a program lowered for an earlier measurement would append to that measurement's record
    with ragged_emulation.emulated_on_cpu(record):
        experts = sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport="ragged",
                                     placement=engine.experts.placement)
        _with_experts(engine, experts).prefill(tokens, cache_len=seq)[0].block_until_ready()
        jax.effects_barrier()
    D, item = cfg.d_model, np.dtype(cfg.jnp_dtype).itemsize
    layers = len(cfg.moe_layers)
    # A dispatched row is int32 words (the hidden state, then its experts' ids and weights); a returned row is
    # the hidden state in the model's dtype.
    moved = {"ep_dispatch": sum(r for dtype, _, r in record if dtype == "int32") / layers,
             "ep_return": sum(r for dtype, shape, r in record if dtype != "int32" and shape == (D,)) / layers}
    dispatch_bytes = sum(r * 4 * math.prod(shape) for dtype, shape, r in record if dtype == "int32") / layers
    P = experts.expert_parallel_size
    n_tokens = tokens.size
    stages = plan.pipeline_degree
    padded_rows = P * P * transports.rows_per_peer(-(-n_tokens // P // plan.token_chunks)) * (
        stages if plan.split == "experts" else plan.token_chunks)
    return dict(dispatch_rows=moved["ep_dispatch"], return_rows=moved["ep_return"],
                dispatch_bytes=dispatch_bytes, return_bytes=moved["ep_return"] * D * item,
                assignments=n_tokens * cfg.router.top_k, padded_rows=padded_rows)


def _with_experts(engine, experts):
    """The engine's model and sharding with another expert compute."""
    from epsjax.engine import Engine
    from flax import nnx

    return Engine(nnx.merge(engine.graphdef, engine.params), experts=experts, batch_sharding=engine.batch_sharding)


def moe_layer_report(cfg, mesh, experts, n_tokens: int) -> str:
    """Compiles one MoE layer's expert compute alone (random routing) and summarises its collectives."""
    import jax
    import jax.numpy as jnp

    from epsjax.sharding import hlo_report

    E, D, F, K, dt = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim, cfg.router.top_k, cfg.jnp_dtype
    args = (jax.ShapeDtypeStruct((n_tokens, D), dt), jax.ShapeDtypeStruct((n_tokens, K), jnp.int32),
            jax.ShapeDtypeStruct((n_tokens, K), jnp.float32), jax.ShapeDtypeStruct((E, D, F), dt),
            jax.ShapeDtypeStruct((E, D, F), dt), jax.ShapeDtypeStruct((E, F, D), dt),
            jax.ShapeDtypeStruct((n_tokens,), jnp.bool_))
    return hlo_report.report(jax.jit(experts).lower(*args).compile().as_text()).summary()


def table(result: dict) -> str:
    head = (f"prefill {result['model']} ({result['dtype']}) batch={result['batch']} seq={result['seq']} on "
            f"{result['devices']} x {result['device_kind']}, median of {result['repeats']}")
    cols = ("strategy", "mesh (data,tensor,expert)", "EP", "PN", "split", "transport", "ms", "tokens/s",
            "max |dlogits|")
    lines = [head, " | ".join(cols), " | ".join("-" * len(c) for c in cols)]
    for r in result["rows"]:
        m = r["mesh"]
        mesh = f"{m.get('data', 1)},{m.get('tensor', 1)},{m.get('expert', 1)}"
        lines.append(" | ".join((r["strategy"], mesh, str(r["expert_parallel"]), str(r["pipeline_degree"]),
                                 r["split"], r["transport"], f"{1e3 * r['median_s']:.1f}",
                                 f"{r['tokens_per_s']:,.0f}", f"{r['max_logit_diff']:.1e}")))
    traffic = [r for r in result["rows"] if "traffic" in r]
    if traffic:
        cols = ("strategy", "PN", "split", "dispatch rows", "return rows", "minimum", "(token, k)", "padded slots",
                "dispatch / (token, k)", "dispatch MiB", "return MiB")
        lines += ["", "what one MoE layer's all-to-alls move (rows summed over devices and stages; minimum: distinct "
                  "(token, device) pairs, the unpipelined plan's dispatch)", " | ".join(cols),
                  " | ".join("-" * len(c) for c in cols)]
        for r in traffic:
            t = r["traffic"]
            minimum = next((q["traffic"]["dispatch_rows"] for q in traffic
                            if q["rule_set"] == r["rule_set"] and q["pipeline_degree"] == 1), float("nan"))
            lines.append(" | ".join((
                r["strategy"], str(r["pipeline_degree"]), r["split"], f"{t['dispatch_rows']:,.0f}",
                f"{t['return_rows']:,.0f}", f"{minimum:,.0f}", f"{t['assignments']:,}", f"{t['padded_rows']:,}",
                f"{t['dispatch_rows'] / t['assignments']:.3f}", f"{t['dispatch_bytes'] / 2**20:.2f}",
                f"{t['return_bytes'] / 2**20:.2f}")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
