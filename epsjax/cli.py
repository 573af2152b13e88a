"""The `epsjax` command line: generate, info.

jax reads its device flags when it is first imported, so this module imports jax only after parsing arguments
(`--devices N` asks XLA:CPU for N virtual devices).

Errors: bad input of any layer (epsjax.errors: a checkpoint, a config field, a request, a plan or mesh, a kernel
backend, or a flag) is one line on stderr and exit status 2; argparse's usage errors also exit 2. Anything else
is a bug and keeps its traceback (exit 1); `--debug` shows the traceback of input errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from epsjax.errors import EpsjaxError  # imports nothing (no jax): the device flags are set later
from epsjax.host_memory import keep_freed_memory


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--preset", default="tiny-deepseek-v2",
                        help="a built-in config with random weights (default: %(default)s; see `epsjax info --list`)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="parameter dtype (default: the checkpoint's, or the preset's)")
    p.add_argument("--devices", type=_positive_int, default=None,
                   help="on CPU, the number of virtual devices to create (XLA_FLAGS host device count)")
    p.add_argument("--quantize", default=None, choices=("fp8",),
                   help="store the routed experts as FP8 W8A8 (e4m3 weights, per-token activation scales); one "
                        "device only for now")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load checkpoint tensors holding NaN or Inf (with a warning) instead of refusing them")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors too")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epsjax", description="Cost-efficient MoE inference in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate tokens from prompts and report throughput")
    _add_model_args(gen)
    prompts = gen.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append",
                         help="token ids, comma or space separated; or text, when the model directory has a "
                              "tokenizer.json and the prompt is not a list of integers (repeatable)")
    prompts.add_argument("--text", action="append", help="text, tokenized with the model directory's tokenizer.json")
    gen.add_argument("--batch", type=_positive_int, default=8, help="random prompts when none are given (default: 8)")
    gen.add_argument("--prompt-len", type=_positive_int, default=32,
                     help="length of the random prompts (default: 32)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=16)
    gen.add_argument("--temperature", type=_finite_float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=_finite_float, default=1.0)
    gen.add_argument("--seed", type=_nonnegative_int, default=0)
    gen.add_argument("--no-token-healing", action="store_true",
                     help="keep a text prompt's last token as tokenized (default: re-choose it among the tokens that "
                          "start with its text, so a prompt ending in a space or a word fragment reads naturally)")
    gen.add_argument("--backend", default="auto",
                     help="expert GEMM backend (default: the load-aware selector; with --pipeline-degree, of "
                          "every stage)")
    comp = gen.add_argument_group("compilation")
    comp.add_argument("--warmup", action="store_true",
                      help="compile the request's shape bucket ahead of it (Engine.warmup, with a progress bar) and "
                           "report the programs and seconds")
    comp.add_argument("--compile-cache", metavar="DIR",
                      help="JAX's persistent compilation cache directory (default: $EPSJAX_COMPILATION_CACHE, else "
                           "~/.cache/epsjax/jax): a second run loads its programs instead of compiling them")
    comp.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
    par = gen.add_argument_group("parallelism (more than one device)")
    par.add_argument("--strategy", default="auto", choices=("auto", "local", "tp", "dp", "tp_ep", "dp_ep", "dep"),
                     help="rule set: attention TP or DP, experts TP, DP or EP (auto: dp_ep on several devices, "
                          "local on one); dep: disaggregated attention and expert groups (FinDEP, see --split, "
                          "--schedule)")
    par.add_argument("--mesh",
                     help="data,tensor,expert sizes, e.g. 1,2,4 (default: as much TP/EP as the model allows)")
    par.add_argument("--pipeline-degree", type=_positive_int,
                     help="force the EPS pipeline degree (default: the scheduler's plan)")
    par.add_argument("--split",
                     help="with --pipeline-degree: EPS stages by expert groups or token chunks, experts|tokens "
                          "(default: experts); with --strategy dep: attention,expert group sizes A,E, e.g. 3,5 "
                          "(default: half the devices each)")
    par.add_argument("--schedule", choices=("findep", "pppipe", "naive"),
                     help="with --strategy dep: the schedule space the FinDEP solver picks the plan from (default: "
                          "findep)")
    par.add_argument("--transport", default="auto", choices=("auto", "ragged", "padded"),
                     help="EP all-to-all: ragged (GPU) or dropless padded (anywhere)")

    info = sub.add_parser("info", help="devices, model summary, parameter and expert memory")
    _add_model_args(info)
    info.add_argument("--list", action="store_true", help="list the built-in presets")
    return parser


def _default_platforms() -> None:
    """CPU when no NVIDIA driver is visible: with the CUDA plugin installed (the gpu or aot extras) jax would
    otherwise try CUDA first and print its failure before falling back. JAX_PLATFORMS, when set, wins."""
    if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["JAX_PLATFORMS"] = "cpu"


class UsageError(EpsjaxError):
    """A flag combination the command cannot use (reported like every input error: one line, exit 2)."""


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # glibc malloc keeps freed host memory: only before the first jax computation
    args = _parser().parse_args(argv)
    _default_platforms()
    if args.devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    try:
        return {"generate": _generate, "info": _info}[args.command](args)
    except EpsjaxError as e:  # bad input (UsageError included): one clear line, no traceback
        if args.debug:
            raise
        print(f"epsjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _load_model(args, mesh=None, rule_set=None):
    """The model from --model or --preset; with a mesh, every parameter is created or loaded into its shards."""
    from flax import nnx

    from epsjax import placement
    from epsjax.checkpoint import load_checkpoint, read_config
    from epsjax.models import MoETransformer, get_preset

    from epsjax.models.quantize import quantize_experts

    quantize = getattr(args, "quantize", None)
    if quantize is not None and mesh is not None:
        raise UsageError(f"--quantize {quantize} runs on one device for now; add --strategy local")
    if args.model:
        cfg = read_config(args.model, dtype=args.dtype)
        shardings = None if mesh is None else placement.param_shardings(cfg, mesh, rule_set)
        layout = None if mesh is None else placement.param_layout(cfg, mesh, rule_set)
        return load_checkpoint(args.model, dtype=args.dtype, shardings=shardings, layout=layout,
                               allow_nonfinite=args.allow_nonfinite, quantize=quantize)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = get_preset(args.preset, **overrides)
    _check_host_memory(cfg)
    if mesh is None:
        model = MoETransformer(cfg, rngs=nnx.Rngs(0))
        return model if quantize is None else quantize_experts(model, quantize)
    return placement.create_sharded_model(cfg, mesh, rule_set, 0)


def _check_host_memory(cfg) -> None:
    import jax.numpy as jnp

    need = cfg.param_counts()["total"] * jnp.dtype(cfg.dtype).itemsize
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise UsageError(f"preset {cfg.name} needs {need / 2**30:.1f} GiB of parameters in {cfg.dtype}; this host "
                         f"has {have / 2**30:.1f} GiB (from Python, get_preset(name, num_layers=N) builds fewer "
                         f"layers; or use a tiny-* preset)")


def _tokenizer(args):
    from pathlib import Path

    if not args.model or not (Path(args.model) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))


def _prompt_ids(text: str, tokenizer) -> list[int]:
    """--prompt: token ids when it parses as integers, else text through the model's tokenizer (if it has one)."""
    if tokenizer is None or _looks_like_ids(text):
        return _parse_ids(text)
    ids = tokenizer.encode(text).ids
    if not ids:
        raise UsageError(f"--prompt {text!r} tokenizes to no tokens")
    return ids


def _heal_prompts(engine, tokenizer, prompts, sampling):
    """Token healing: a text prompt's last token is often a fragment that never precedes what follows it in
    training (e.g. the lone space of "def ", where text has " name" as one token), and conditions the model on
    something it has rarely seen. Each prompt whose last token is a prefix of other tokens is cut before it, and
    its last token is re-chosen by the model among the tokens that start with that text (greedy, or sampled as
    --temperature says); the continuation follows the healed prompt. --no-token-healing turns it off."""
    import numpy as np

    vocab = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    cut = [p for p in prompts if len(p) >= 2]
    if not cut:
        return prompts
    ids = [np.asarray(p[:-1]) for p in cut]
    tokens_BT, mask_BT, cache_len = engine.request_shapes(ids, 1)
    logits_BV, _, _ = engine.prefill(tokens_BT, mask_BT, cache_len=cache_len, pad_rows=tokens_BT.shape[0] - len(ids))
    logits_BV = np.asarray(logits_BV, np.float64)
    rng = np.random.default_rng(sampling.seed)
    healed, row = [], 0
    for p in prompts:
        if len(p) < 2:
            healed.append(p)
            continue
        tail = vocab[p[-1]]
        allowed = np.array([i for i, t in enumerate(vocab[:logits_BV.shape[1]]) if t.startswith(tail)])
        scores = logits_BV[row, allowed]
        row += 1
        if len(allowed) <= 1:
            healed.append(p)
            continue
        if sampling.temperature == 0:
            choice = int(allowed[np.argmax(scores)])
        else:
            z = np.exp((scores - scores.max()) / sampling.temperature)
            choice = int(rng.choice(allowed, p=z / z.sum()))
        print(f"healed     prompt {len(healed)}: last token {tail!r} -> {vocab[choice]!r} (token healing, among "
              f"{len(allowed)} tokens that start with it)")
        healed.append(list(p[:-1]) + [choice])
    return healed


def _looks_like_ids(text: str) -> bool:
    parts = text.replace(",", " ").split()
    return bool(parts) and all(p.lstrip("-").isdigit() for p in parts)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--prompt takes token ids (e.g. '1,2,3'), got {text!r}; use --text for text") from None
    if not ids:
        raise UsageError(f"--prompt {text!r} holds no token ids")
    return ids


def _generate(args) -> int:
    import jax
    import numpy as np

    from epsjax import pallas_kernels
    from epsjax import sharding
    from epsjax import placement
    from epsjax.checkpoint import read_config
    from epsjax.engine import Engine, SamplingParams
    from epsjax.models import LocalExperts, get_preset

    from epsjax.compilation import CompileCounter, enable_compilation_cache

    if args.no_compile_cache and args.compile_cache:
        raise UsageError("--compile-cache and --no-compile-cache contradict each other; give one")
    cache_dir = None if args.no_compile_cache else enable_compilation_cache(args.compile_cache)
    cfg = read_config(args.model, dtype=args.dtype) if args.model else get_preset(
        args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    if args.backend != "auto" and args.backend not in pallas_kernels.BACKENDS:
        raise UsageError(f"--backend must be auto or one of {', '.join(pallas_kernels.BACKENDS)}, got "
                         f"{args.backend!r}")
    if args.devices and jax.devices()[0].platform != "cpu":
        raise UsageError(f"--devices makes virtual CPU devices, and this run is on {jax.devices()[0].platform}")
    tokenizer = _tokenizer(args)
    text_prompts = False
    if args.text:
        if tokenizer is None:
            raise UsageError("--text needs a model directory with a tokenizer.json; give token ids with --prompt")
        prompts = [tokenizer.encode(t).ids for t in args.text]
        text_prompts = True
    elif args.prompt:
        prompts = [_prompt_ids(p, tokenizer) for p in args.prompt]
        text_prompts = tokenizer is not None and not all(_looks_like_ids(p) for p in args.prompt)
    else:
        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    prompt_len = max(len(p) for p in prompts)

    devices = jax.devices()
    predicted = None  # (seconds, cost model) of the prefill, where the scheduler planned it
    strategy, note = args.strategy, ""
    if strategy != "dep" and args.schedule:
        raise UsageError("--schedule chooses a DEP schedule; add --strategy dep")
    if strategy != "dep" and args.split not in (None, "experts", "tokens"):
        raise UsageError(f"--split takes experts or tokens (EPS pipeline stages), got {args.split!r}; attention,"
                         "expert group sizes such as 3,5 go with --strategy dep")
    if strategy == "auto":
        # Expert parallelism with data-parallel attention when the batch splits over every device.
        strategy = "dp_ep" if len(devices) > 1 and len(prompts) % len(devices) == 0 else "local"
        if strategy == "local" and len(devices) > 1:
            note = f" ({len(prompts)} prompts do not split over {len(devices)} devices)"
    if strategy == "dep":
        engine, plan = _dep_engine(args, cfg, prompts, prompt_len, devices)
    elif strategy == "local":
        model = _load_model(args)
        per_expert = sum(len(p) for p in prompts) * cfg.router.top_k / cfg.num_experts
        choice = pallas_kernels.select_backend(tokens_per_expert=per_expert, num_experts=cfg.num_experts,
                                               k=cfg.d_model, n=cfg.expert_ffn_dim, dtype=cfg.dtype, op="expert_ffn")
        backend = choice.backend if args.backend == "auto" else args.backend
        engine = Engine(model, experts=LocalExperts(backend=args.backend))
        plan = (f"one device{note}, all experts local; GEMM backend {backend} ({per_expert:.1f} tokens/expert"
                f"{': ' + choice.reason if args.backend == 'auto' else ''})")
    else:
        if args.mesh:
            try:
                sizes = [int(x) for x in args.mesh.split(",")]
            except ValueError:
                sizes = []
            if len(sizes) != 3 or min(sizes) < 1:
                raise UsageError(f"--mesh takes three positive data,tensor,expert sizes, got {args.mesh!r}")
            shape = dict(zip(("data", "tensor", "expert"), sizes))
        else:
            shape = placement.default_mesh_shape(strategy, cfg, len(devices))
        mesh = sharding.make_mesh(**shape)
        sharding.rules_for_model(cfg, mesh, strategy)  # clear errors for experts / heads that do not divide
        batch_shards = int(np.prod([mesh.shape[a] for a in sharding.get_rules(strategy).batch_axes]))
        if len(prompts) % batch_shards:
            raise UsageError(f"{len(prompts)} prompts do not divide over the {batch_shards} batch shards of "
                             f"--strategy {strategy} on mesh {shape}; give a multiple of {batch_shards} prompts")
        forced = None if args.pipeline_degree is None else sharding.ExpertPlan(
            args.pipeline_degree, args.split or "experts", backends=(args.backend,))
        experts, source = placement.ep_experts(cfg, mesh, strategy, batch=len(prompts), seq_len=prompt_len,
                                               plan=forced, transport=args.transport)
        model = _load_model(args, mesh, strategy)
        engine = Engine(model, experts=experts, batch_sharding=sharding.batch_sharding(mesh, strategy))
        p = experts.plan
        plan = (f"{strategy} on mesh data={shape.get('data', 1)} tensor={shape.get('tensor', 1)} "
                f"expert={shape.get('expert', 1)}; pipeline degree {p.pipeline_degree}"
                f"{' split by ' + p.split if p.pipeline_degree > 1 else ''}, backends {','.join(p.backends)}, "
                f"transport {experts.resolved_transport} ({source})")
        if experts.expert_parallel_size > 1:
            r = cfg.router
            plan += "\ndispatch   " + sharding.device_reach(cfg.num_experts, experts.expert_parallel_size, r.top_k,
                                                              r.n_group, r.topk_group)[1]
        if source.startswith("scheduler: predicted"):
            from epsjax import scheduler

            plan_choice = scheduler.search_for(cfg, dict(mesh.shape), len(prompts), prompt_len, rule_set=strategy)
            predicted = scheduler.predict_prefill(cfg, dict(mesh.shape), len(prompts), prompt_len,
                                                  plan_choice.plan, rule_set=strategy)
        if experts.placement is not None:
            slots = experts.placement
            plan += (f"\nexperts    {cfg.num_experts} over {slots.devices} devices in {slots.slots} slots each: "
                     f"{','.join(map(str, slots.experts_per_device()))} per device (empty slots hold zeros)")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    print(f"model      {cfg.name} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts top-"
          f"{cfg.router.top_k}, {cfg.dtype}{', routed experts FP8 W8A8' if args.quantize == 'fp8' else ''})")
    print(f"devices    {len(devices)} x {devices[0].device_kind}")
    print(f"plan       {plan}")

    if text_prompts and not args.no_token_healing:
        prompts = _heal_prompts(engine, tokenizer, prompts, sampling)
    start = time.perf_counter()
    with CompileCounter() as compiled:
        if args.warmup:
            engine.warmup((len(prompts),), (prompt_len,), (args.max_new_tokens,), sampling=sampling)
        engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)  # compiles (the rest)
    print(f"compile    {compiled.programs} programs in {compiled.seconds:.1f} s of {time.perf_counter() - start:.1f} s "
          f"for the first request; {compiled.cache_hits} loaded from the persistent cache "
          f"({cache_dir if cache_dir is not None else 'off'})")
    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(f"prefill    {result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms: "
          f"{result.prefill_tokens_per_s:,.0f} tokens/s")
    if predicted is not None:
        seconds, costs = predicted
        calibrated = any(v.startswith("calibrated") for v in dict(costs.hw.sources).values())
        print(f"predicted  prefill {seconds * 1e3:.1f} ms by the cost model ({costs.hw.name}, "
              f"{'calibrated' if calibrated else 'preset constants'}): {seconds / result.prefill_seconds:.2f}x "
              f"the measured")
    print(f"decode     {result.generated_tokens} tokens in {result.decode_seconds * 1e3:.1f} ms: "
          f"{result.decode_tokens_per_s:,.0f} tokens/s")
    if result.dropped:
        print(f"dropped    {result.dropped} expert assignments (capacity limit)")
    for i, tokens in enumerate(result.tokens):
        print(f"output[{i}]  {tokens}" + ("" if tokenizer is None else f"  {tokenizer.decode(tokens)!r}"))
        if tokenizer is not None:  # the prompt and its continuation, as text (newlines kept, indented)
            text = tokenizer.decode(list(prompts[i]) + list(tokens))
            print(f"text[{i}]\n" + "\n".join("  | " + line for line in text.split("\n")))
    return 0


def _dep_split(text: str | None, devices: int) -> tuple[int, int]:
    """--split A,E of --strategy dep: attention and expert group sizes (default: half the devices each)."""
    if text is None:
        if devices < 2:
            raise UsageError("--strategy dep needs at least 2 devices (an attention and an expert group); on CPU "
                             "add --devices 8")
        return devices // 2, devices - devices // 2
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"--split with --strategy dep takes two positive attention,expert group sizes such as 3,5, "
                         f"got {text!r}")
    if sum(sizes) > devices:
        raise UsageError(f"--split {text}: {sum(sizes)} devices, but only {devices} exist")
    return sizes[0], sizes[1]


def _dep_engine(args, cfg, prompts, prompt_len: int, devices):
    """--strategy dep: the groups, the plan the FinDEP solver picks for this batch in the --schedule space (from the
    device kind's cost model), and a DEPRuntime's engine running it. Returns (engine, plan description)."""
    import math

    from epsjax import dep
    from epsjax.dep.runtime import DEPRuntime
    from epsjax.dep.workloads import for_batch
    from epsjax.scheduler.hardware import hardware_for_device_kind
    from flax import nnx
    from epsjax.models import MoETransformer

    if args.quantize:
        raise UsageError(f"--quantize {args.quantize} runs on one device for now; --strategy dep takes float experts")
    ag, eg = _dep_split(args.split, len(devices))
    groups = dep.DEPGroups.split(ag, eg, cfg.num_experts, devices)
    space = args.schedule or "findep"
    sequences = math.ceil(len(prompts) / ag)  # per attention device
    kind = devices[0].device_kind
    solution = None
    if hardware_for_device_kind(kind) is not None:
        testbed = dep.Testbed(f"{len(devices)}x{kind}", kind, len(devices), gpus_per_node=len(devices))
        problem = dep.problem_for(cfg, dep.Deployment.split(testbed, ag, eg), seq_len=prompt_len)
        solution = for_batch(problem, sequences, space)
    if solution is not None and solution.plan is not None:
        schedule = solution.plan.schedule
        hw = testbed.hw
        calibrated = any(v.startswith("calibrated") for v in dict(hw.sources).values())
        how = (f"picked by the FinDEP solver from the {space} space for {len(prompts)} prompts of {prompt_len} "
               f"tokens ({solution.plan.describe()}, {solution.evaluated} plans): predicted prefill step "
               f"{solution.makespan * 1e3:.2f} ms by the cost model ({hw.name}, "
               f"{'calibrated' if calibrated else 'preset constants'})")
    else:
        schedule = {"naive": dep.DEPSchedule.naive(), "pppipe": dep.DEPSchedule.pppipe(2),
                    "findep": dep.DEPSchedule.findep(2, 2, "AASS")}[space]
        why = "no cost model for device kind " + repr(kind) if solution is None else "no plan fits the cost model"
        how = f"the {space} default ({why})"
    if args.model:
        runtime = DEPRuntime.from_checkpoint(args.model, groups, dtype=args.dtype, backend=args.backend,
                                             progress=True, allow_nonfinite=args.allow_nonfinite)
    else:
        _check_host_memory(cfg)
        runtime = DEPRuntime(MoETransformer(cfg, rngs=nnx.Rngs(0)), groups, backend=args.backend)
    plan = (f"dep: {groups.describe()}\nschedule   {schedule.describe()}, {how}\nplacement  each expert device holds "
            f"its {groups.placement.slots} expert slots of every MoE layer, each attention device the attention-side "
            f"parameters; the KV cache stays on the attention group")
    return runtime.engine(schedule), plan


def _info(args) -> int:
    import jax
    import jax.numpy as jnp

    from epsjax.checkpoint import read_config
    from epsjax.models import get_preset, list_presets

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
