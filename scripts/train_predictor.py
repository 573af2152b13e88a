"""Train the routing-path predictor on collected traces and evaluate it on held-out sequences.

    .venv/bin/python scripts/collect_routing_traces.py --out /tmp/traces.npz
    .venv/bin/python scripts/train_predictor.py --traces /tmp/traces.npz --out scripts/results/predictor_tiny-mixtral

Writes to --out: the predictor (predictor_config.json, predictor.safetensors; RoutingPredictor.load reads them)
and metrics.json: per layer, on held-out sequences,
  * per-token top-k recall (|predicted top-k & routed top-k| / k),
  * ExpertFlow's batch recall for decode batches of 1, 4, 8 and 16 sequences (the union of the batch's predicted
    experts against the experts its tokens use), against the temporal-locality baseline (the previous step's
    experts), with the number of experts each predicts,
  * replayed decode hit ratios of the cache (batch 4) at 10%, 25%, 50% of the experts: LRU, LFU, temporal-prefetch
    and predictor-prefetch (PLEC + predictor-aware eviction).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from epsjax.offload import metrics, simulate, traces
from epsjax.offload.predictor import PredictorConfig, train_predictor


def evaluate(predictor, tokens, ids, *, batch_sizes=(1, 4, 8, 16), fractions=(0.1, 0.25, 0.5), sim_batch=4):
    probs = np.asarray(predictor.probs(tokens))
    N, T, L, K = ids.shape
    E = predictor.config.num_experts
    out = {"topk_recall": metrics.topk_recall(probs, ids).tolist(), "batch_recall": {}, "hit_ratio": {}}
    for b in batch_sizes:
        out["batch_recall"][b] = {k: v.tolist() for k, v in metrics.batch_recall(probs, ids, batch_size=b).items()}
    for fraction in fractions:
        slots = max(1, int(fraction * L * E))
        row = {}
        for name, policy, forecast in (("lru", "lru", "none"), ("lfu", "lfu", "none"),
                                       ("temporal_prefetch", "predictor", "temporal"),
                                       ("predictor_prefetch", "predictor", "predictor")):
            stats = simulate.replay_decode(ids, batch_size=sim_batch, num_slots=slots, policy=policy,
                                           forecast=forecast, probs_NTLE=probs)
            row[name] = {"hit_ratio": stats.hit_ratio, "loads_per_access": stats.loads / stats.accesses}
        out["hit_ratio"][f"{fraction:g}"] = {"slots": slots, **row}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = traces.load_traces(args.traces)
    tokens, ids = data["tokens"], data["ids"]
    model_desc = json.loads(str(data["model"])) if "model" in data else {}
    (train_tokens, train_ids), (test_tokens, test_ids) = traces.split(tokens, ids, held_out=args.held_out,
                                                                      seed=args.seed)
    vocab = int(model_desc.get("vocab_size", 0)) or int(tokens.max()) + 1
    config = PredictorConfig(vocab_size=max(vocab, int(tokens.max()) + 1), num_layers=ids.shape[2],
                             num_experts=int(model_desc.get("num_experts", ids.max() + 1)), top_k=ids.shape[3],
                             d_model=args.d_model, window=args.window, enc_layers=args.enc_layers)
    predictor, history = train_predictor(train_tokens, train_ids, config, steps=args.steps,
                                         batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, log=print)
    start = time.perf_counter()
    result = evaluate(predictor, test_tokens, test_ids)
    out = pathlib.Path(args.out)
    predictor.save(out)
    report = {"model": model_desc, "traces": {"train": list(train_ids.shape), "held_out": list(test_ids.shape)},
              "predictor": vars(args) | {"config": config.__dict__},
              "train_seconds": history["seconds"], "loss": history["loss"],
              "eval_seconds": time.perf_counter() - start, "platform": _platform(), **result}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"-> {out}")


def _platform() -> str:
    import jax

    return f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"


def print_report(r):
    L = len(r["topk_recall"])
    print(f"trained in {r['train_seconds']:.1f} s on {r['platform']}")
    print("per-token top-k recall per layer: " + " ".join(f"{x:.3f}" for x in r["topk_recall"]))
    print("batch recall per layer (predictor | temporal baseline) [experts predicted | true]:")
    for b, row in r["batch_recall"].items():
        cells = [f"{row['predictor_recall'][l]:.3f} | {row['temporal_recall'][l]:.3f}" for l in range(L)]
        print(f"  batch {b:>2}: " + "   ".join(cells) +
              f"   [{np.mean(row['predictor_set_size']):.2f} | {np.mean(row['true_set_size']):.2f}]")
    print("replayed decode hit ratio (batch 4):")
    for fraction, row in r["hit_ratio"].items():
        cells = [f"{k} {v['hit_ratio']:.3f}" for k, v in row.items() if k != "slots"]
        print(f"  {float(fraction):>4.0%} ({row['slots']} slots): " + ", ".join(cells))


if __name__ == "__main__":
    main()
