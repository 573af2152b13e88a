"""build: a DeploymentSpec -> a Deployment, each set-up step once (epsjax.deployment's docstring); the checks that
need the devices, the model or the request, before anything heavy runs for them."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from epsjax import pallas_kernels, placement, sharding
from epsjax.deployment import memory
from epsjax.deployment.spec import PREDICTOR_DIR, PREDICTOR_FILES, DeploymentSpec, RequestShape, SpecError
from epsjax.engine import Engine
from epsjax.models import LocalExperts, ModelConfig, MoETransformer, get_preset


@dataclasses.dataclass(frozen=True)
class GemmBackend:
    """The expert GEMM backend one device runs for a request, chosen as the kernel will choose it: from the padded
    [B', T'] prefill the engine runs (Engine.request_shapes) and its [B', 1] decode steps."""

    prefill: str
    prefill_tokens_per_expert: float
    decode: str
    decode_tokens_per_expert: float
    padded_shape: tuple[int, int]
    reason: str | None  # the selector's, for the prefill (None when forced)


@dataclasses.dataclass(frozen=True, eq=False)
class Deployment:
    """A built deployment: every set-up product, each made once.

    cfg: the model config (config.json parsed once). strategy: the resolved one (local, tp, dp, tp_ep, dp_ep, dep).
    mesh, params (placement.ParamPlacement: rules, expert slots, abstract model, shardings), plan
    (placement.ExpertPlanChoice: the plan and its PlanSource, the scheduler's one search and predicted prefill):
    mesh strategies only. backend: one device's GEMM backend (GemmBackend). engine: what serves requests.
    description: the `plan` line(s) of `epsjax generate`. steps: (set-up step, seconds) in the order they ran.
    """

    spec: DeploymentSpec
    request: RequestShape
    cfg: ModelConfig
    devices: tuple
    strategy: str
    engine: Engine
    description: str
    steps: tuple[tuple[str, float], ...]
    mesh: Mesh | None = None
    params: placement.ParamPlacement | None = None
    plan: placement.ExpertPlanChoice | None = None
    backend: GemmBackend | None = None
    model: MoETransformer | None = None

    @property
    def rules(self) -> sharding.Rules | None:
        return None if self.params is None else self.params.rules

    @property
    def expert_slots(self) -> sharding.ExpertPlacement | None:
        """Where the routed experts live over the EP devices (None: the plain [E, ...] stacking, or no mesh)."""
        return None if self.params is None else self.params.slots

    @property
    def shardings(self):
        return None if self.params is None else self.params.shardings

    def offload_summary(self, stats=None) -> str | None:
        """Offload: mode, budget and device slots; with the cache's statistics of a run (offload.CacheStats), its
        hit ratio. None when the experts are not offloaded."""
        if self.spec.offload is None:
            return None
        engine, spec = self.engine, self.spec
        store, cache = engine.store, engine.cache
        line = (f"{spec.offload}: budget {spec.offload_budget:g} of {store.total_bytes / 2**20:.2f} MiB routed-"
                f"expert bytes, {cache.num_slots} device slots for {store.num_layers} x {store.num_experts} experts "
                f"(+{engine.config.max_inflight} in flight), host store {store.memory_kind or 'numpy'}")
        if stats is not None:
            line += (f"; hit ratio {stats.hit_ratio:.2f} ({stats.hits} of {stats.accesses} expert uses resident), "
                     f"{stats.loads} copies of {store.bytes_per_expert / 2**10:.0f} KiB")
        return line


class _Steps:
    """The set-up steps of one build, each timed."""

    def __init__(self):
        self.done: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.done.append((name, time.perf_counter() - start))


def build(spec: DeploymentSpec, request: RequestShape = RequestShape(), *, devices=None,
          progress: bool = True) -> Deployment:
    """The deployment of `spec` planned for `request` on `devices` (default jax.devices()); module docstring.
    progress: the checkpoint loading bar."""
    if not isinstance(spec, DeploymentSpec):
        raise SpecError(f"build takes a DeploymentSpec, got {type(spec).__name__}")
    if not isinstance(request, RequestShape):
        raise SpecError(f"build plans for a RequestShape, got {type(request).__name__}")
    devices = tuple(jax.devices() if devices is None else devices)
    steps = _Steps()
    with steps("config"):
        cfg = _config(spec)
    with steps("strategy"):
        strategy, note = _strategy(spec, request, len(devices))
    common = dict(spec=spec, request=request, cfg=cfg, devices=devices, strategy=strategy)
    if strategy == "dep":
        return _build_dep(common, steps, progress)
    if strategy == "local":
        return _build_local(common, steps, note, progress)
    return _build_mesh(common, steps, progress)


def _config(spec: DeploymentSpec) -> ModelConfig:
    """The preset's config, or config.json's checked against the checkpoint's headers (checkpoint.check_checkpoint:
    every declared size against the tensors) before anything is built or planned for it."""
    if spec.model is not None:
        from epsjax.checkpoint import check_checkpoint

        return check_checkpoint(spec.model, dtype=spec.dtype)[0]
    return get_preset(spec.preset, **({"dtype": spec.dtype} if spec.dtype else {}))


def _strategy(spec: DeploymentSpec, request: RequestShape, devices: int) -> tuple[str, str]:
    """(resolved strategy, a note on why auto chose one device)."""
    if spec.strategy != "auto":
        return spec.strategy, ""
    if devices > 1 and spec.offload is not None:
        return "local", f" (--offload {spec.offload} runs on one device)"
    if devices > 1 and spec.quantize is not None:
        return "local", f" (--quantize {spec.quantize} runs on one device)"
    if devices > 1 and request.batch % devices == 0:  # expert parallelism, attention data parallel
        return "dp_ep", ""
    if spec.mesh is not None or spec.pipeline_degree is not None:
        flag = "--mesh" if spec.mesh is not None else "--pipeline-degree"
        raise SpecError(f"{flag} needs a mesh strategy, and --strategy auto runs {request.batch} prompts on one of "
                        f"{devices} devices (they do not split over them); give --strategy dp_ep (or tp_ep, tp, dp)")
    return "local", (f" ({request.batch} prompts do not split over {devices} devices)" if devices > 1 else "")


def _check_memory(common: dict, steps: _Steps, **where) -> None:
    """The one memory check (epsjax.deployment.memory) before any weight is made or read; where: a mesh's
    placement, or DEP's dep_split and dep_slots."""
    with steps("memory"):
        memory.check(memory.Case(common["spec"], common["cfg"], common["request"], common["strategy"], **where),
                     common["devices"])


def _engine_options(spec: DeploymentSpec) -> dict:
    return {"buckets": spec.buckets, **({} if spec.decode_chunk is None else {"decode_chunk": spec.decode_chunk})}


# One device --------------------------------------------------------------------------------------------------------


def _build_local(common: dict, steps: _Steps, note: str, progress: bool) -> Deployment:
    spec, cfg, request = common["spec"], common["cfg"], common["request"]
    if spec.offload is not None:
        return _build_offload(common, steps, note, progress)
    _check_memory(common, steps)
    with steps("weights"):
        if spec.model is not None:
            from epsjax.checkpoint import load_checkpoint

            model = load_checkpoint(spec.model, cfg=cfg, allow_nonfinite=spec.allow_nonfinite,
                                    quantize=spec.quantize, progress=progress)
        else:
            from epsjax.models.quantize import quantize_experts

            model = MoETransformer(cfg, rngs=nnx.Rngs(0))
            model = model if spec.quantize is None else quantize_experts(model, spec.quantize)
    with steps("engine"):
        engine = Engine(model, experts=LocalExperts(backend=spec.backend), **_engine_options(spec))
    with steps("backend"):
        backend = _local_backend(spec, cfg, engine, request)
    auto = spec.backend == "auto"
    description = (f"one device{note}, all experts local; GEMM backend {backend.prefill} "
                   f"({backend.prefill_tokens_per_expert:.1f} tokens/expert of the padded "
                   f"{backend.padded_shape[0]}x{backend.padded_shape[1]} prefill"
                   f"{': ' + backend.reason if auto and backend.reason else ''}), {backend.decode} for decode steps "
                   f"({backend.decode_tokens_per_expert:.2f} tokens/expert)")
    return Deployment(**common, engine=engine, description=description, steps=tuple(steps.done), backend=backend,
                      model=model)


def _local_backend(spec: DeploymentSpec, cfg: ModelConfig, engine: Engine, request: RequestShape,
                   exclude: tuple[str, ...] = ()) -> GemmBackend:
    """The backend the grouped expert FFN resolves "auto" to (pallas_kernels.api: M rows / E groups) for the
    padded prefill the engine runs for `request` and for a decode step of that batch."""
    ids = [np.zeros(request.prompt_len, np.int64)] * request.batch
    tokens_BT, _, _ = engine.request_shapes(ids, request.max_new_tokens)
    B, T = tokens_BT.shape
    K, E = cfg.router.top_k, cfg.num_experts

    def choose(rows: int):
        per_expert = rows * K / E
        if spec.backend != "auto":
            return spec.backend, per_expert, None
        dtype = cfg.dtype
        if spec.quantize is not None:  # W8A8 off Hopper: float GEMMs on dequantized operands, f32 off GPU
            from epsjax.pallas_kernels import fp8

            if fp8.uses_fp8_kernel("auto", cfg.d_model, cfg.expert_ffn_dim):
                return "mosaic_gpu (FP8)", per_expert, "the FP8 GroupGemm on Hopper"
            dtype = dtype if jax.devices()[0].platform in ("gpu", "cuda") else "float32"
        choice = pallas_kernels.select_backend(
            tokens_per_expert=per_expert, num_experts=E, k=cfg.d_model, n=cfg.expert_ffn_dim, dtype=dtype,
            op="expert_ffn" if spec.quantize is None else "group_gemm", exclude=exclude)
        return choice.backend, per_expert, choice.reason

    prefill, prefill_tpe, reason = choose(B * T)
    decode, decode_tpe, _ = choose(B)
    return GemmBackend(prefill, prefill_tpe, decode, decode_tpe, (B, T), reason)


def _build_offload(common: dict, steps: _Steps, note: str, progress: bool) -> Deployment:
    """The routed experts in a host ExpertStore and a device cache (epsjax.offload), on the first device."""
    from epsjax.offload.runtime import _SLOT_DEPENDENT, OffloadConfig, OffloadEngine, expert_bytes

    spec, cfg, request = common["spec"], common["cfg"], common["request"]
    device = common["devices"][0]
    config = OffloadConfig(mode="lru" if spec.offload == "lfu" else spec.offload,
                           budget_fraction=float(spec.offload_budget),
                           policy="lfu" if spec.offload == "lfu" else None, backend=spec.backend)
    experts = len(cfg.moe_layers) * cfg.num_experts
    fits = math.floor(config.budget(expert_bytes(cfg)) / (expert_bytes(cfg) / experts))
    if fits < config.max_inflight + 1:
        least = (config.max_inflight + 1) / experts
        raise SpecError(f"--offload-budget {spec.offload_budget:g} holds {fits} of {cfg.name}'s {experts} routed "
                        f"experts; the cache needs {config.max_inflight} in flight + 1 slot: give at least "
                        f"{math.ceil(least * 1000) / 1000:g}")
    _check_memory(common, steps)
    with steps("predictor"):
        predictor = _predictor(spec, cfg) if spec.offload == "expertflow" else None
    with steps("weights"):
        if spec.model is not None:  # the routed experts straight from the files to host memory
            from epsjax.checkpoint import load_host_experts

            split = load_host_experts(spec.model, cfg=cfg, device=device, progress=progress,
                                      allow_nonfinite=spec.allow_nonfinite)
        else:
            from epsjax.offload.runtime import split_experts

            with _host_default_device():  # random weights made on the host, experts never on the device
                split = split_experts(MoETransformer(cfg, rngs=nnx.Rngs(0)))
    with steps("engine"):
        try:
            engine = OffloadEngine.from_split(cfg, *split, config, predictor=predictor, device=device,
                                              buckets=spec.buckets)
        except ValueError as e:  # offload's own checks (a predictor that does not fit the model)
            raise SpecError(f"--offload {spec.offload}: {e}") from None
    del split
    with steps("backend"):
        backend = _local_backend(spec, cfg, engine, request, exclude=_SLOT_DEPENDENT)
    description = (f"one device{note}, routed experts offloaded ({spec.offload}); GEMM backend {backend.prefill} "
                   f"({backend.prefill_tokens_per_expert:.1f} tokens/expert of the padded "
                   f"{backend.padded_shape[0]}x{backend.padded_shape[1]} prefill"
                   f"{': ' + backend.reason if spec.backend == 'auto' and backend.reason else ''}), {backend.decode} "
                   f"for decode steps ({backend.decode_tokens_per_expert:.2f} tokens/expert)")
    return Deployment(**common, engine=engine, description=description, steps=tuple(steps.done), backend=backend)


@contextlib.contextmanager
def _host_default_device():
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process
        yield
        return
    with jax.default_device(cpu):
        yield


def _predictor(spec: DeploymentSpec, cfg: ModelConfig):
    """expertflow's routing predictor: spec.predictor, else the checkpoint's predictor/ directory."""
    from epsjax.offload.predictor import RoutingPredictor

    how = ("train one on this model's routing (scripts/collect_routing_traces.py, then scripts/train_predictor.py "
           "--out DIR) and pass --predictor DIR")
    if spec.predictor is not None:
        path = Path(spec.predictor)
    elif spec.model is not None and (Path(spec.model) / PREDICTOR_DIR).is_dir():
        path = Path(spec.model) / PREDICTOR_DIR
    else:
        where = (f"{spec.model} has no {PREDICTOR_DIR}/ directory" if spec.model is not None
                 else f"preset {spec.preset} has random weights and no predictor")
        raise SpecError(f"--offload expertflow forecasts routing with a predictor trained for {cfg.name}, and {where}; "
                        f"{how}")
    absent = [name for name in PREDICTOR_FILES if not (path / name).is_file()]
    if absent:
        raise SpecError(f"--predictor {path}: no {' or '.join(absent)} (RoutingPredictor.save's files); {how}")
    return RoutingPredictor.load(path)


# A mesh ------------------------------------------------------------------------------------------------------------


def _build_mesh(common: dict, steps: _Steps, progress: bool) -> Deployment:
    spec, cfg, request, strategy = common["spec"], common["cfg"], common["request"], common["strategy"]
    with steps("mesh"):
        if spec.mesh is not None:
            shape = dict(zip(sharding.AXES, spec.mesh))
        else:
            shape = placement.default_mesh_shape(strategy, cfg, len(common["devices"]))
        mesh = sharding.make_mesh(**shape, devices=common["devices"])
    with steps("placement"):  # rules_for_model, the expert slots, nnx.eval_shape, the shardings: once each
        params = placement.place(cfg, mesh, strategy)
    batch_shards = math.prod(mesh.shape[a] for a in params.rules.batch_axes)
    if request.batch % batch_shards:
        raise SpecError(f"{request.batch} prompts do not divide over the {batch_shards} batch shards of "
                        f"--strategy {strategy} on mesh {shape}; give a multiple of {batch_shards} prompts")
    _check_memory(common, steps, placement=params)
    with steps("plan"):
        forced = None if spec.pipeline_degree is None else sharding.ExpertPlan(
            spec.pipeline_degree, spec.split or "experts", backends=(spec.backend,))
        plan = placement.choose_expert_plan(cfg, mesh, params.rules, params.slots, batch=request.batch,
                                            seq_len=request.prompt_len, plan=forced)
        experts = params.ep_experts(plan.plan, spec.transport)
    with steps("weights"):
        if spec.model is not None:
            from epsjax.checkpoint import load_checkpoint

            model = load_checkpoint(spec.model, cfg=cfg, model_shape=(params.graphdef, params.abstract),
                                    shardings=params.sharding, layout=params.layout,
                                    allow_nonfinite=spec.allow_nonfinite, progress=progress)
        else:
            model = params.create_model(0)
    with steps("engine"):
        engine = Engine(model, experts=experts, batch_sharding=sharding.batch_sharding(mesh, params.rules),
                        **_engine_options(spec))
    p = plan.plan
    description = (f"{strategy} on mesh data={mesh.shape['data']} tensor={mesh.shape['tensor']} "
                   f"expert={mesh.shape['expert']}; pipeline degree {p.pipeline_degree}"
                   f"{' split by ' + p.split if p.pipeline_degree > 1 else ''}, backends {','.join(p.backends)}, "
                   f"transport {experts.resolved_transport} ({plan.describe()})")
    if experts.expert_parallel_size > 1:
        r = cfg.router
        description += "\ndispatch   " + sharding.device_reach(cfg.num_experts, experts.expert_parallel_size,
                                                               r.top_k, r.n_group, r.topk_group)[1]
    if params.slots is not None:
        slots = params.slots
        description += (f"\nexperts    {cfg.num_experts} over {slots.devices} devices in {slots.slots} slots each: "
                        f"{','.join(map(str, slots.experts_per_device()))} per device (empty slots hold zeros)")
    return Deployment(**common, engine=engine, description=description, steps=tuple(steps.done), mesh=mesh,
                      params=params, plan=plan, model=model)


# Disaggregated (FinDEP) --------------------------------------------------------------------------------------------


def _build_dep(common: dict, steps: _Steps, progress: bool) -> Deployment:
    """The attention and expert groups, the plan the FinDEP solver picks for the request in the schedule space (from
    the device kind's cost model), and a DEPRuntime's engine running it."""
    from epsjax import dep
    from epsjax.dep.runtime import DEPRuntime
    from epsjax.dep.workloads import for_batch
    from epsjax.scheduler.hardware import hardware_for_device_kind

    spec, cfg, request, devices = common["spec"], common["cfg"], common["request"], list(common["devices"])
    if spec.dep_split is None:
        if len(devices) < 2:
            raise SpecError("--strategy dep needs at least 2 devices (an attention and an expert group); on CPU "
                            "add --devices 8")
        ag, eg = len(devices) // 2, len(devices) - len(devices) // 2
    else:
        ag, eg = spec.dep_split
        if ag + eg > len(devices):
            raise SpecError(f"--split {ag},{eg}: {ag + eg} devices, but only {len(devices)} exist")
    with steps("mesh"):
        groups = dep.DEPGroups.split(ag, eg, cfg.num_experts, devices)
    _check_memory(common, steps, dep_split=(ag, eg), dep_slots=groups.placement.slots)
    with steps("plan"):
        space = spec.dep_schedule or "findep"
        sequences = math.ceil(request.batch / ag)  # per attention device
        kind = devices[0].device_kind
        solution = None
        if hardware_for_device_kind(kind) is not None:
            testbed = dep.Testbed(f"{len(devices)}x{kind}", kind, len(devices), gpus_per_node=len(devices))
            problem = dep.problem_for(cfg, dep.Deployment.split(testbed, ag, eg), seq_len=request.prompt_len)
            solution = for_batch(problem, sequences, space)
        if solution is not None and solution.plan is not None:
            schedule = solution.plan.schedule
            hw = testbed.hw
            calibrated = any(str(v).startswith("calibrated") for v in dict(hw.sources).values())
            how = (f"picked by the FinDEP solver from the {space} space for {request.batch} prompts of "
                   f"{request.prompt_len} tokens ({solution.plan.describe()}, {solution.evaluated} plans): predicted "
                   f"prefill step {solution.makespan * 1e3:.2f} ms by the cost model ({hw.name}, "
                   f"{'calibrated' if calibrated else 'preset constants'})")
        else:
            schedule = {"naive": dep.DEPSchedule.naive(), "pppipe": dep.DEPSchedule.pppipe(2),
                        "findep": dep.DEPSchedule.findep(2, 2, "AASS")}[space]
            why = "no cost model for device kind " + repr(kind) if solution is None else "no plan fits the cost model"
            how = f"the {space} default ({why})"
    with steps("weights"):  # each parameter read once, straight onto its group (as dep.placement.load_placed)
        if spec.model is not None:
            from epsjax.checkpoint import load_checkpoint
            from epsjax.dep.placement import group_shardings

            where, layout = group_shardings(groups)
            model = load_checkpoint(spec.model, cfg=cfg, shardings=where, layout=layout, progress=progress,
                                    allow_nonfinite=spec.allow_nonfinite)
        else:
            model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    with steps("engine"):
        runtime = DEPRuntime(model, groups, backend=spec.backend, buckets=spec.buckets)
        engine = runtime.engine(schedule)
    description = (f"dep: {groups.describe()}\nschedule   {schedule.describe()}, {how}\nplacement  each expert "
                   f"device holds its {groups.placement.slots} expert slots of every MoE layer, each attention device "
                   f"the attention-side parameters; the KV cache stays on the attention group")
    return Deployment(**common, engine=engine, description=description, steps=tuple(steps.done))
