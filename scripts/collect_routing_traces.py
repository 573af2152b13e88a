"""Collect routing traces: run a model over token sequences and record every MoE layer's top-k expert ids.

    .venv/bin/python scripts/collect_routing_traces.py --preset tiny-mixtral --num-seqs 512 --seq-len 64 \
        --out /tmp/traces_tiny-mixtral.npz

Tokens come from epsjax.offload.traces.synthetic_corpus (a Zipfian bigram chain; tiny models have no tokenizer or
data), or from --tokens FILE (a .npy [N, T] int array). The model is a preset with random weights from --seed (and
--override field=value), or --checkpoint DIR (an HF safetensors directory). The .npz holds tokens [N, T],
ids [N, T, L, K] and the model description; scripts/train_predictor.py reads it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from epsjax.offload import traces
from epsjax.offload.runtime import OffloadConfig, OffloadEngine


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--override", action="append", default=[], help="ModelConfig field=value (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--checkpoint", help="HF checkpoint directory instead of a random preset")
    p.add_argument("--tokens", help=".npy [N, T] token ids instead of the synthetic corpus")
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--corpus-seed", type=int, default=0, help="samples (the chain itself is --chain-seed)")
    p.add_argument("--chain-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    overrides = traces.parse_overrides(args.override)
    model = traces.build_model(args.preset, overrides, seed=args.seed, checkpoint=args.checkpoint)
    cfg = model.cfg
    if args.tokens:
        tokens = np.load(args.tokens).astype(np.int32)
    else:
        tokens = traces.synthetic_corpus(cfg.vocab_size, args.num_seqs, args.seq_len, seed=args.corpus_seed,
                                         chain_seed=args.chain_seed)
    engine = OffloadEngine(model, OffloadConfig(mode="device"), record_routing=True)
    start = time.perf_counter()
    ids = traces.collect_traces(engine, tokens, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    model_desc = {"preset": args.preset, "overrides": overrides, "seed": args.seed, "checkpoint": args.checkpoint,
                  "vocab_size": cfg.vocab_size,
                  "name": cfg.name, "num_experts": cfg.num_experts, "top_k": cfg.router.top_k,
                  "moe_layers": list(cfg.moe_layers)}
    traces.save_traces(args.out, tokens, ids, model=json.dumps(model_desc))
    print(f"{tokens.shape[0]} sequences x {tokens.shape[1]} tokens, ids {ids.shape}, in {seconds:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
