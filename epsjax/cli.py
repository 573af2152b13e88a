"""The `epsjax` command line: generate, serve, info.

`epsjax generate` is thin over epsjax.deployment: flags -> DeploymentSpec -> build (each set-up step once) ->
engine.generate -> the report. `epsjax serve` shares its model and deployment flags and puts the engine behind
epsjax.serve's HTTP server.

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


def _float(text: str) -> float:
    """An argparse type: any number (range checks belong to the deployment spec, which names the flag)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


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


def _add_deployment_args(p: argparse.ArgumentParser):
    """The flags of the deployment spec and compilation cache, shared by generate and serve; returns the
    compilation group."""
    p.add_argument("--backend", default="auto",
                   help="expert GEMM backend (default: the load-aware selector; with --pipeline-degree, of every "
                        "stage)")
    comp = p.add_argument_group("compilation")
    comp.add_argument("--compile-cache", metavar="DIR",
                      help="JAX's persistent compilation cache directory (default: $EPSJAX_COMPILATION_CACHE, else "
                           "~/.cache/epsjax/jax): a second run loads its programs instead of compiling them")
    comp.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
    par = p.add_argument_group("parallelism (more than one device)")
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
    p.add_argument("--force", action="store_true",
                   help="load even when the memory check finds that the parameters and KV cache do not fit the "
                        "devices or the host (it says what would fit)")
    off = p.add_argument_group("offloading (one device)")
    off.add_argument("--offload", choices=("lru", "lfu", "expertflow"),
                     help="keep the routed experts in host memory, read straight from the checkpoint, and cache "
                          "some on the device: lru / lfu eviction, or expertflow (a routing predictor forecasts "
                          "each step's experts; see --predictor)")
    off.add_argument("--offload-budget", type=_float, metavar="FRACTION",
                     help="with --offload: the device cache's share of the routed-expert bytes, in (0, 1]")
    off.add_argument("--predictor", metavar="DIR",
                     help="with --offload expertflow: a routing predictor directory (RoutingPredictor.save's files; "
                          "default: the checkpoint's predictor/ directory)")
    return comp


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
    _add_deployment_args(gen).add_argument(
        "--warmup", action="store_true", help="compile the request's shape bucket ahead of it (Engine.warmup, with a "
                                              "progress bar) and report the programs and seconds")

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, SSE, /metrics)")
    _add_model_args(srv)
    net = srv.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    net.add_argument("--port", type=_nonnegative_int, default=8000, help="port (default: %(default)s; 0: a free one)")
    net.add_argument("--max-slots", type=_positive_int, default=8,
                     help="decode slots: requests generating at once (default: %(default)s)")
    net.add_argument("--max-queue", type=_nonnegative_int, default=64,
                     help="requests waiting for a slot beyond which new ones get 429 (default: %(default)s)")
    net.add_argument("--max-model-len", type=_positive_int, default=None,
                     help="each slot's context: a prompt's length bucket plus max_tokens must fit it (default: the "
                          "model's maximum sequence length, at most 2048)")
    net.add_argument("--steps-per-iteration", type=_positive_int, default=2,
                     help="decode steps between admissions of waiting requests (default: %(default)s)")
    net.add_argument("--served-model-name", default=None, help="the model id /v1/models lists (default: the "
                                                              "directory's or preset's name)")
    net.add_argument("--api-key", default=None,
                     help="require `Authorization: Bearer KEY` on every endpoint but /health (default: "
                          "$EPSJAX_API_KEY, else none)")
    _add_deployment_args(srv).add_argument(
        "--warmup", action="store_true", help="compile the prefill buckets and the decode step of the slots before "
                                              "listening, so that no request compiles")

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
        return {"generate": _generate, "serve": _serve, "info": _info}[args.command](args)
    except EpsjaxError as e:  # bad input (UsageError included): one clear line, no traceback
        if args.debug:
            raise
        print(f"epsjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _tokenizer(args):
    """The model directory's tokenizer.json, or None without one. A file that is there and cannot be used (a
    directory or a broken link in its place, unreadable, not JSON, not a tokenizer the tokenizers library reads) is
    a CheckpointError naming it. (tokenizer_config.json and generation_config.json are not read: the chat template,
    special tokens and generation defaults come from the flags and config.json.)"""
    from pathlib import Path

    from epsjax.checkpoint import CheckpointError, file_present

    if not args.model:
        return None
    file = Path(args.model) / "tokenizer.json"
    if not file_present(file, "tokenizer.json"):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions, without the file name
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{file}: tokenizer.json cannot be loaded by the tokenizers library ({reason}); "
                              "re-download it, or remove it and give token ids with --prompt") from None


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


def _spec(args):
    """The deployment spec of `epsjax generate`'s flags (flag syntax is checked here, their meaning by the spec)."""
    from epsjax.deployment import DeploymentSpec

    mesh = None
    if args.mesh:
        try:
            mesh = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            mesh = ()
        if len(mesh) != 3 or min(mesh) < 1:
            raise UsageError(f"--mesh takes three positive data,tensor,expert sizes, got {args.mesh!r}")
    dep = args.strategy == "dep"
    return DeploymentSpec(
        model=args.model, preset=None if args.model else args.preset, dtype=args.dtype, strategy=args.strategy,
        mesh=mesh, pipeline_degree=args.pipeline_degree, split=None if dep else args.split, backend=args.backend,
        transport=args.transport, quantize=args.quantize, offload=args.offload, offload_budget=args.offload_budget,
        predictor=args.predictor, dep_split=_dep_split(args.split) if dep else None, dep_schedule=args.schedule,
        allow_nonfinite=args.allow_nonfinite, force=args.force)


def _generate(args) -> int:
    import dataclasses

    import jax
    import numpy as np

    from epsjax.compilation import CompileCounter
    from epsjax.deployment import RequestShape, build
    from epsjax.engine import SamplingParams

    if args.no_compile_cache and args.compile_cache:
        raise UsageError("--compile-cache and --no-compile-cache contradict each other; give one")
    spec = _spec(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.devices and jax.devices()[0].platform != "cpu":
        raise UsageError(f"--devices makes virtual CPU devices, and this run is on {jax.devices()[0].platform}")
    cache_dir = None if args.no_compile_cache else _compilation_cache(args.compile_cache)
    tokenizer = _tokenizer(args)
    text_prompts, prompts = False, None
    if args.text:
        if tokenizer is None:
            raise UsageError("--text needs a model directory with a tokenizer.json; give token ids with --prompt")
        prompts = [tokenizer.encode(t).ids for t in args.text]
        text_prompts = True
    elif args.prompt:
        prompts = [_prompt_ids(p, tokenizer) for p in args.prompt]
        text_prompts = tokenizer is not None and not all(_looks_like_ids(p) for p in args.prompt)
    request = RequestShape(batch=len(prompts) if prompts else args.batch,
                           prompt_len=max(len(p) for p in prompts) if prompts else args.prompt_len,
                           max_new_tokens=args.max_new_tokens)
    deployment = build(spec, request)
    cfg, engine, devices = deployment.cfg, deployment.engine, deployment.devices
    if prompts is None:  # random prompts, in the model's vocabulary
        prompts = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()

    print(f"model      {cfg.name} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts top-"
          f"{cfg.router.top_k}, {cfg.dtype}{', routed experts FP8 W8A8' if args.quantize == 'fp8' else ''})")
    print(f"devices    {len(devices)} x {devices[0].device_kind}")
    print(f"plan       {deployment.description}")

    if text_prompts and not args.no_token_healing:
        prompts = _heal_prompts(engine, tokenizer, prompts, sampling)
    start = time.perf_counter()
    with CompileCounter() as compiled:
        if args.warmup:
            engine.warmup((len(prompts),), (request.prompt_len,), (args.max_new_tokens,), sampling=sampling)
        engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)  # compiles (the rest)
    print(f"compile    {compiled.programs} programs in {compiled.seconds:.1f} s of {time.perf_counter() - start:.1f} s "
          f"for the first request; {compiled.cache_hits} loaded from the persistent cache "
          f"({cache_dir if cache_dir is not None else 'off'})")
    before = dataclasses.replace(engine.stats) if spec.offload else None
    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(f"prefill    {result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms: "
          f"{result.prefill_tokens_per_s:,.0f} tokens/s")
    predicted = deployment.plan.prefill if deployment.plan is not None else None
    if predicted is not None:
        print(f"predicted  prefill {predicted.prefill_s * 1e3:.1f} ms by the cost model ({predicted.costs.hw.name}, "
              f"{'calibrated' if predicted.calibrated else 'preset constants'}): "
              f"{predicted.prefill_s / result.prefill_seconds:.2f}x the measured")
    print(f"decode     {result.generated_tokens} tokens in {result.decode_seconds * 1e3:.1f} ms: "
          f"{result.decode_tokens_per_s:,.0f} tokens/s")
    if spec.offload:
        print(f"offload    {deployment.offload_summary(_stats_since(before, engine.stats))} (the timed request)")
    if result.dropped:
        print(f"dropped    {result.dropped} expert assignments (capacity limit)")
    for i, tokens in enumerate(result.tokens):
        print(f"output[{i}]  {tokens}" + ("" if tokenizer is None else f"  {tokenizer.decode(tokens)!r}"))
        if tokenizer is not None:  # the prompt and its continuation, as text (newlines kept, indented)
            text = tokenizer.decode(list(prompts[i]) + list(tokens))
            print(f"text[{i}]\n" + "\n".join("  | " + line for line in text.split("\n")))
    return 0


def _serve(args) -> int:
    """`epsjax serve`: the deployment of the flags, planned for a batch of --max-slots, behind the HTTP server."""
    import asyncio
    from pathlib import Path

    import jax

    from epsjax.deployment import RequestShape, build
    from epsjax.serve import make_server, serve_forever

    if args.no_compile_cache and args.compile_cache:
        raise UsageError("--compile-cache and --no-compile-cache contradict each other; give one")
    if args.devices and jax.devices()[0].platform != "cpu":
        raise UsageError(f"--devices makes virtual CPU devices, and this run is on {jax.devices()[0].platform}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("EPSJAX_API_KEY") or None
    if args.api_key == "":
        raise UsageError("--api-key is empty")
    spec = _spec(args)
    cache_dir = None if args.no_compile_cache else _compilation_cache(args.compile_cache)
    tokenizer = _tokenizer(args)
    from epsjax.checkpoint import read_config
    from epsjax.models import get_preset

    max_seq_len = (read_config(args.model) if args.model else get_preset(args.preset)).max_seq_len
    context = args.max_model_len or min(max_seq_len, 2048)
    if context > max_seq_len:
        raise UsageError(f"--max-model-len {context} exceeds the model's maximum sequence length {max_seq_len}")
    deployment = build(spec, RequestShape(batch=args.max_slots, prompt_len=max(1, context // 2),
                                          max_new_tokens=max(1, context - context // 2)))
    cfg, engine = deployment.cfg, deployment.engine
    name = args.served_model_name or (Path(args.model).name if args.model else cfg.name)
    print(f"model      {cfg.name} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts top-"
          f"{cfg.router.top_k}, {cfg.dtype}); tokenizer: {'tokenizer.json' if tokenizer else 'none (token ids)'}")
    print(f"devices    {len(deployment.devices)} x {deployment.devices[0].device_kind}")
    print(f"plan       {deployment.description}")
    server = make_server(engine, model_name=name, num_slots=args.max_slots, cache_len=context,
                         max_queue=args.max_queue, steps=args.steps_per_iteration, tokenizer=tokenizer,
                         api_key=api_key, warmup=args.warmup)
    if args.warmup:
        print(f"warmup     {server.warmup['programs']} programs in {server.warmup['seconds']:.1f} s: prefill and "
              f"insert of every prompt bucket, the decode step, release (compile cache: "
              f"{cache_dir if cache_dir is not None else 'off'})")

    def listening(port: int) -> None:
        print(f"serving    {name} on http://{args.host}:{port}/v1 ({args.max_slots} slots of {context} tokens, "
              f"queue {args.max_queue}{', API key required' if api_key else ''})", flush=True)

    try:
        asyncio.run(serve_forever(server, args.host, args.port, listening))
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the address is taken or cannot be bound
        server.scheduler.stop()
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0


def _compilation_cache(directory):
    """enable_compilation_cache, its warning (a directory that cannot be used: the run goes on without the cache)
    printed as one line."""
    import warnings

    from epsjax.compilation import CompilationCacheWarning, enable_compilation_cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompilationCacheWarning)
        path = enable_compilation_cache(directory)
    for warning in caught:
        if issubclass(warning.category, CompilationCacheWarning):
            print(f"epsjax generate: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return path


def _stats_since(before, after):
    """The offload cache's counters of one request: `after` minus `before` (both offload.CacheStats)."""
    import dataclasses

    counts = {f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)
              if f.name != "peak_device_bytes"}
    return dataclasses.replace(after, **counts)


def _dep_split(text: str | None) -> tuple[int, int] | None:
    """--split A,E of --strategy dep: attention and expert group sizes (None: the deployment's default)."""
    if text is None:
        return None
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"--split with --strategy dep takes two positive attention,expert group sizes such as 3,5, "
                         f"got {text!r}")
    return sizes[0], sizes[1]


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
    if args.model and _has_weights(args.model):  # what it reports must be what the files hold
        from epsjax.checkpoint import check_checkpoint

        check_checkpoint(args.model, cfg)
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


def _has_weights(model: str) -> bool:
    """Whether a model directory holds safetensors weights (`epsjax info` also describes a config.json alone)."""
    from pathlib import Path

    from epsjax.checkpoint import file_present

    path = Path(model)
    return (file_present(path / "model.safetensors", "model.safetensors")
            or file_present(path / "model.safetensors.index.json", "the shard index"))


if __name__ == "__main__":
    sys.exit(main())
