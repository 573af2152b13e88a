"""The `epsjax` command line: generate, info.

jax reads its device flags when it is first imported, so this module imports jax only after parsing arguments
(`--devices N` asks XLA:CPU for N virtual devices).
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--preset", default="tiny-deepseek-v2",
                        help="a built-in config with random weights (default: %(default)s; see `epsjax info --list`)")
    p.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's, or the preset's)")
    p.add_argument("--devices", type=int, default=None,
                   help="on CPU, the number of virtual devices to create (XLA_FLAGS host device count)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epsjax", description="Cost-efficient MoE inference in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate tokens from prompts and report throughput")
    _add_model_args(gen)
    prompts = gen.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="token ids, comma or space separated (repeatable)")
    prompts.add_argument("--text", action="append", help="text, tokenized with the model directory's tokenizer.json")
    gen.add_argument("--batch", type=int, default=8, help="random prompts when none are given (default: 8)")
    gen.add_argument("--prompt-len", type=int, default=32, help="length of the random prompts (default: 32)")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--backend", default="auto", help="expert GEMM backend (default: the load-aware selector)")

    info = sub.add_parser("info", help="devices, model summary, parameter and expert memory")
    _add_model_args(info)
    info.add_argument("--list", action="store_true", help="list the built-in presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    try:
        return {"generate": _generate, "info": _info}[args.command](args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"epsjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _load_model(args):
    from flax import nnx

    from epsjax.checkpoint import load_checkpoint
    from models import MoETransformer, get_preset

    if args.model:
        return load_checkpoint(args.model, dtype=args.dtype)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = get_preset(args.preset, **overrides)
    _check_host_memory(cfg)
    return MoETransformer(cfg, rngs=nnx.Rngs(0))


def _check_host_memory(cfg) -> None:
    import jax.numpy as jnp

    need = cfg.param_counts()["total"] * jnp.dtype(cfg.dtype).itemsize
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise ValueError(f"preset {cfg.name} needs {need / 2**30:.1f} GiB of parameters in {cfg.dtype}; this host "
                         f"has {have / 2**30:.1f} GiB (use --num-layers-style overrides from Python, or a tiny-* preset)")


def _tokenizer(args):
    from pathlib import Path

    if not args.model or not (Path(args.model) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise ValueError(f"--prompt takes token ids (e.g. '1,2,3'), got {text!r}; use --text for text") from e


def _generate(args) -> int:
    import jax
    import numpy as np

    import pallas_kernels
    from epsjax.engine import Engine, SamplingParams
    from models import LocalExperts

    model = _load_model(args)
    cfg = model.cfg
    tokenizer = _tokenizer(args)
    if args.text:
        if tokenizer is None:
            raise ValueError("--text needs a model directory with a tokenizer.json; give token ids with --prompt")
        prompts = [tokenizer.encode(t).ids for t in args.text]
    elif args.prompt:
        prompts = [_parse_ids(p) for p in args.prompt]
    else:
        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()

    devices = jax.devices()
    batch_sharding = None
    if len(devices) > 1 and len(prompts) % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        strategy = f"data parallel over {len(devices)} devices (batch split, weights replicated)"
    else:
        strategy = f"single device ({len(devices)} visible; batch {len(prompts)} not divisible)" if len(
            devices) > 1 else "single device"
    engine = Engine(model, experts=LocalExperts(backend=args.backend), batch_sharding=batch_sharding)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    prompt_tokens = sum(len(p) for p in prompts)
    per_expert = prompt_tokens * cfg.router.top_k / cfg.num_experts
    choice = pallas_kernels.select_backend(tokens_per_expert=per_expert, num_experts=cfg.num_experts,
                                           k=cfg.d_model, n=cfg.expert_ffn_dim, dtype=cfg.dtype, op="expert_ffn")
    backend = choice.backend if args.backend == "auto" else args.backend
    print(f"model      {cfg.name} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts top-"
          f"{cfg.router.top_k}, {cfg.dtype})")
    print(f"devices    {len(devices)} x {devices[0].device_kind}")
    print(f"plan       {strategy}; experts: all local, prefill GEMM backend {backend} "
          f"({per_expert:.1f} tokens/expert{': ' + choice.reason if args.backend == 'auto' else ''}); "
          f"pipeline degree 1")

    engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)  # compiles
    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(f"prefill    {result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms: "
          f"{result.prefill_tokens_per_s:,.0f} tokens/s")
    print(f"decode     {result.generated_tokens} tokens in {result.decode_seconds * 1e3:.1f} ms: "
          f"{result.decode_tokens_per_s:,.0f} tokens/s")
    if result.dropped:
        print(f"dropped    {result.dropped} expert assignments (capacity limit)")
    for i, tokens in enumerate(result.tokens):
        line = f"output[{i}]  {tokens}"
        if tokenizer is not None:
            line += f"  {tokenizer.decode(tokens)!r}"
        print(line)
    return 0


def _info(args) -> int:
    import jax
    import jax.numpy as jnp

    from epsjax.checkpoint import read_config
    from models import get_preset, list_presets

    if args.list:
        for name in list_presets():
            cfg = get_preset(name)
            print(f"{name:18s} {cfg.family:12s} {cfg.param_counts()['total'] / 1e9:8.2f}B params, "
                  f"{cfg.num_experts} experts top-{cfg.router.top_k}")
        return 0
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    print(f"devices    {len(devices)} ({jax.default_backend()}: {', '.join(kinds)}), jax {jax.__version__}")
    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = read_config(args.model, **overrides) if args.model else get_preset(args.preset, **overrides)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    counts = cfg.param_counts()
    attention = "MLA" if cfg.mla else f"GQA ({cfg.num_heads} heads, {cfg.num_kv_heads} kv heads)"
    print(f"model      {cfg.name}: {cfg.family}, {cfg.num_layers} layers ({len(cfg.moe_layers)} MoE), "
          f"d_model {cfg.d_model}, {attention}, vocab {cfg.vocab_size}, {cfg.dtype}")
    print(f"experts    {cfg.num_experts} x ffn {cfg.expert_ffn_dim}, top-{cfg.router.top_k}"
          + (f", shared ffn {cfg.shared_ffn_dim}" if cfg.shared_ffn_dim else "")
          + (", dense residual" if cfg.dense_residual else ""))
    for kind in ("embedding", "attention", "dense_ffn", "router", "shared_experts", "routed_experts", "total"):
        n = counts[kind]
        print(f"  {kind:16s} {n / 1e9:9.3f}B params {n * itemsize / 2**30:9.2f} GiB")
    per_layer = cfg.expert_params_per_layer * itemsize
    print(f"  {'per expert':16s} {3 * cfg.d_model * cfg.expert_ffn_dim * itemsize / 2**20:9.2f} MiB; "
          f"per MoE layer {per_layer / 2**30:.2f} GiB")
    print(f"  {'active/token':16s} {counts['active_per_token'] / 1e9:9.3f}B params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
