"""Build for Hopper without a GPU: the expert kernels, the EP MoE layer and a whole prefill, compiled by XLA:GPU
for compile-only devices (pallas_kernels.targets), and what the compilers say about them.

    devices = targets.compile_only_devices("h100", 8)
    kernel_builds(devices[0], "mixtral-8x7b")     # registers, spills, serialized wgmma per kernel x tiling
    ep_layer_build(devices, cfg, "dp_ep", ExpertPlan(2), "ragged")   # the collective schedule of one layer
    prefill_build(devices, cfg, "dp_ep")          # a whole model's prefill: does it compile, what runs async

What it proves: the programs build for sm_90a with the real compilers (XLA:GPU's passes and latency-hiding
scheduler, Mosaic GPU, Triton, ptxas); ptxas's register and spill counts are exact for that build. What it
cannot: no timings, and no autotuning (without a device XLA keeps its default GEMM and fusion choices).

ptxas reports reach this process on its file descriptors: Mosaic GPU prints them when MOSAIC_GPU_DUMP_PTXAS=1;
XLA's own kernels (the Pallas Triton backend among them) only with TF_CPP_MIN_LOG_LEVEL=0 and
TF_CPP_VMODULE=subprocess_compilation=2 set before jax is imported (scripts/aot_check.py sets them); the jax-triton kernel's PTX is assembled here with the toolkit's ptxas.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from epsjax import sharding
from epsjax import placement
from epsjax.models import ModelConfig, get_preset
from epsjax.pallas_kernels import group_gemm_jax_triton, group_gemm_mgpu, group_gemm_triton, selector, targets, tokamax_gemm
from epsjax.sharding import hlo_report

KERNEL_MODELS = ("mixtral-8x7b", "deepseek-v2", "deepseek-v2-lite")
GPU_BACKENDS = ("mosaic_gpu", "pallas_triton", "jax_triton", "tokamax")
# What kernel_builds compiles: every GPU backend, and the Mosaic GroupGemm's FP8 (8-bit wgmma) kernels.
KERNEL_BUILD_BACKENDS = GPU_BACKENDS + ("mosaic_gpu_fp8",)
# XLA:GPU (jax 0.11.2) runs collectives synchronously unless its latency-hiding scheduler is on; EP programs
# built for a GPU turn it on (sharding.EPExperts.compiler_options), which is what makes a stage's all-to-all
# overlap another stage's GEMMs.
_KERNEL_MODULES = {"mosaic_gpu": group_gemm_mgpu, "mosaic_gpu_fp8": group_gemm_mgpu, "pallas_triton": group_gemm_triton,
                   "jax_triton": group_gemm_jax_triton, "tokamax": tokamax_gemm}
_KERNEL_NAMES = {("mosaic_gpu", "gate_up"): "gate_up_mosaic_gpu_kernel",
                 ("mosaic_gpu", "down"): "group_gemm_mosaic_gpu_kernel",
                 ("mosaic_gpu_fp8", "gate_up"): "gate_up_fp8_mosaic_gpu_kernel",
                 ("mosaic_gpu_fp8", "down"): "group_gemm_fp8_mosaic_gpu_kernel",
                 ("pallas_triton", "gate_up"): "gate_up_triton", ("pallas_triton", "down"): "group_gemm_triton",
                 ("jax_triton", "gate_up"): "_kernel", ("jax_triton", "down"): "_kernel",
                 # openxla/tokamax's Hopper ragged_dot (a peer): the gate/up build is its two unfused calls
                 ("tokamax", "gate_up"): "ragged_dot_sm90_mosaic_gpu_kernel",
                 ("tokamax", "down"): "ragged_dot_sm90_mosaic_gpu_kernel"}


def native_logs_enabled() -> bool:
    """Whether XLA's ptxas reports reach this process (the variables must be set before jax is imported)."""
    return (os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"
            and "subprocess_compilation" in os.environ.get("TF_CPP_VMODULE", ""))


# Kernels ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelBuild:
    """One expert kernel compiled for a GPU target, and what ptxas said about it."""

    backend: str
    op: str                     # "gate_up" (fused, [M, D] x 2 [E, D, F]) or "down" ([M, F] x [E, F, D])
    model: str
    M: int
    K: int
    N: int
    E: int
    tiling: str                 # the tiling's repr ("default" for None)
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    serialized_wgmma: bool | None = None
    accumulator_registers: int | None = None  # Mosaic GPU resource model: per consumer thread
    accumulator_budget: int | None = None     # Mosaic GPU resource model: what a consumer thread may hold
    smem_bytes: int | None = None             # Mosaic GPU resource model
    compile_s: float = 0.0
    error: str = ""

    @property
    def clean(self) -> bool:
        """Compiled, reported, no spills, wgmma not serialized."""
        return (not self.error and self.registers is not None and not self.spill_store_bytes
                and not self.spill_load_bytes and not self.serialized_wgmma)


def kernel_tilings(backend: str, op: str, k: int, n: int, dtype) -> list:
    """The tilings the selector can pick for ``backend`` (selector.candidate_tilings) that the kernel takes for
    ``op`` with contracting dim ``k`` and output dim ``n`` (gate_up: D, F; down: F, D). A gate/up tiling must
    also fit the down kernel: the expert FFN runs both with one tiling."""
    mosaic_op = "expert_ffn" if op == "gate_up" else "group_gemm"
    if backend == "mosaic_gpu_fp8":
        dtype = group_gemm_mgpu.FP8
    return [t for t in selector.candidate_tilings(backend)
            if not backend.startswith("mosaic_gpu") or group_gemm_mgpu.supports(dtype, k, n, t, op=mosaic_op)]


def kernel_builds(device, model: str, *, backends=KERNEL_BUILD_BACKENDS, tokens: int = 4096, dtype=jnp.bfloat16,
                  tilings: str = "all", progress=None) -> list[KernelBuild]:
    """Compiles the fused gate/up and the down kernel of every backend at ``model``'s expert shapes for the
    compile-only ``device``, for every selectable tiling ("all") or the default one ("default")."""
    cfg = get_preset(model)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim
    mesh = Mesh(np.array([device]), ("x",))
    out = []
    for backend in backends:
        for op, (k, n) in (("gate_up", (D, F)), ("down", (F, D))):
            # The expert FFN's table entries carry one tiling for both kernels; "default" gives each its own.
            candidates = kernel_tilings(backend, op, k, n, dtype) if tilings == "all" else [None]
            for tiling in candidates:
                build = _kernel_build(mesh, backend, op, model, tokens, k, n, E, dtype, tiling)
                out.append(build)
                if progress:
                    progress(build)
    return out


def _kernel_build(mesh, backend, op, model, m, k, n, e, dtype, tiling) -> KernelBuild:
    build = KernelBuild(backend, op, model, m, k, n, e, "default" if tiling is None else repr(tiling))
    module = _KERNEL_MODULES[backend]
    replicated = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((m, k), dtype, sharding=replicated)
    w = jax.ShapeDtypeStruct((e, k, n), dtype, sharding=replicated)
    sizes = jax.ShapeDtypeStruct((e,), jnp.int32, sharding=replicated)
    if backend == "mosaic_gpu_fp8":  # e4m3 rows with per-row scales, K-major e4m3 weights with channel scales
        dtype = group_gemm_mgpu.FP8
        x = jax.ShapeDtypeStruct((m, k), dtype, sharding=replicated)
        scaled_w = (jax.ShapeDtypeStruct((e, n, k), dtype, sharding=replicated),
                    jax.ShapeDtypeStruct((e, n), jnp.float32, sharding=replicated))
        row_scale = jax.ShapeDtypeStruct((m,), jnp.float32, sharding=replicated)
        kernel_fn = group_gemm_mgpu.gate_up_fp8 if op == "gate_up" else group_gemm_mgpu.group_gemm_fp8
        fn = lambda *a: kernel_fn(*a, tiling=tiling)  # noqa: E731
        args = (x, row_scale, *scaled_w * (2 if op == "gate_up" else 1), sizes)
    elif op == "gate_up":
        fn, args = (lambda a, b, c, g: module.gate_up(a, b, c, g, tiling=tiling)), (x, w, w, sizes)
    else:
        fn, args = (lambda a, b, g: module.group_gemm(a, b, g, tiling=tiling)), (x, w, sizes)
    if backend.startswith("mosaic_gpu"):
        num_weights = 2 if op == "gate_up" else 1
        fitted = group_gemm_mgpu.check_tiling(tiling, dtype, k, n, num_weights)
        model_resources = group_gemm_mgpu.resources(fitted, jnp.dtype(dtype).itemsize, num_weights)
        build.accumulator_registers = model_resources.accumulator_registers
        build.accumulator_budget, build.smem_bytes = model_resources.accumulator_budget, model_resources.smem_bytes
    start = time.perf_counter()
    try:
        # tokamax reads the GPU architecture from the default device: the compile-only one here.
        with targets.capture_native_output() as captured, jax.set_mesh(mesh), jax.default_device(
                mesh.devices.flat[0]):
            jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a failed build is a result, reported with its message
        build.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return build
    finally:
        build.compile_s = round(time.perf_counter() - start, 2)
    if backend == "jax_triton":  # compiled by triton inside jax-triton, which reports nothing: assemble its PTX
        report = targets.ptxas_resources(group_gemm_jax_triton.ptx(
            m, k, n, dtype, tiling, fused=op == "gate_up",
            compute_capability=targets.target_for_kind(mesh.devices.flat[0].device_kind).compute_capability_int))
    else:
        report = targets.ptxas_report(captured[0])
    kernel = report.get(_KERNEL_NAMES[(backend, op)])
    if kernel is None:
        build.error = (f"no ptxas report for {_KERNEL_NAMES[(backend, op)]!r}"
                       + ("" if native_logs_enabled() or backend.startswith("mosaic_gpu") else
                          " (set TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=subprocess_compilation=2 before importing jax)"))
        return build
    build.registers, build.serialized_wgmma = kernel.registers, kernel.serialized_wgmma
    build.spill_store_bytes, build.spill_load_bytes = kernel.spill_store_bytes, kernel.spill_load_bytes
    return build


# The EP MoE layer ---------------------------------------------------------------------------------------------------


def moe_layer_args(cfg: ModelConfig, experts: sharding.EPExperts, tokens: int) -> tuple:
    """Abstract arguments of one MoE layer's expert compute (x, ids, weights, w_gate, w_up, w_down, valid) with
    the shardings the model gives them under the experts' rule set."""
    E, D, F, K, dt = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim, cfg.router.top_k, cfg.jnp_dtype
    mesh, rules = experts.mesh, experts.rule_set
    batch = NamedSharding(mesh, P(rules.batch_axes or None))
    ep, tp = rules.expert_axes or None, rules.expert_tensor_axes or None
    w_DF, w_FD = NamedSharding(mesh, P(ep, None, tp)), NamedSharding(mesh, P(ep, tp, None))
    S = jax.ShapeDtypeStruct
    return (S((tokens, D), dt, sharding=batch), S((tokens, K), jnp.int32, sharding=batch),
            S((tokens, K), jnp.float32, sharding=batch), S((E, D, F), dt, sharding=w_DF),
            S((E, D, F), dt, sharding=w_DF), S((E, F, D), dt, sharding=w_FD), S((tokens,), jnp.bool_, sharding=batch))


@dataclasses.dataclass
class EPBuild:
    """One EP MoE layer compiled for a mesh of GPU devices, and its collective schedule."""

    model: str
    rule_set: str
    mesh: dict
    pipeline_degree: int
    split: str
    transport: str
    tokens: int
    backends: list[str]                 # GEMM backends in the program (custom-call targets)
    report: hlo_report.Report | None = None
    compile_s: float = 0.0
    error: str = ""

    def stage_overlap(self) -> dict[str, bool]:
        """For each collective that can overlap another stage's GEMMs (dispatch s >= 1: stage s-1's; return
        s <= PN-2: stage s+1's), whether it is asynchronous with such a GEMM between its start and done."""
        out = {}
        for s in range(self.pipeline_degree):
            for kind, possible in (("dispatch", s >= 1), ("return", s <= self.pipeline_degree - 2)):
                if possible:
                    pair = self.report.pair(f"ep_{kind}_{s}") if self.report else None
                    out[f"ep_{kind}_{s}"] = bool(pair and pair.overlaps_other_stage_gemm())
        return out

    def pipelined(self) -> bool | None:
        """The pipeline's promise on the GPU transport (ragged) with PN > 1: every dispatch that can (s >= 1)
        is in flight while another stage's GEMM kernels run. None where it does not apply."""
        if self.transport != "ragged" or self.pipeline_degree < 2:
            return None
        overlap = self.stage_overlap()
        return all(overlap[f"ep_dispatch_{s}"] for s in range(1, self.pipeline_degree))

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "report"}
        out["report"] = self.report.to_json() if self.report else None
        out["stage_overlap"] = self.stage_overlap() if self.report else {}
        out["pipelined"] = self.pipelined() if self.report else None
        return out


def ep_layer_build(devices, cfg: ModelConfig, rule_set: str, plan: sharding.ExpertPlan, transport: str, *,
                   tokens: int = 8192) -> EPBuild:
    """Compiles one MoE layer's expert compute under ``rule_set`` over the compile-only ``devices`` (the mesh
    placement.default_mesh_shape gives) and reads its schedule."""
    shape = placement.default_mesh_shape(rule_set, cfg, len(devices))
    mesh = sharding.make_mesh(**shape, devices=devices)
    build = EPBuild(cfg.name, rule_set, shape, plan.pipeline_degree, plan.split, transport, tokens, [])
    start = time.perf_counter()
    try:
        experts = sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan, transport=transport)
        compiled = jax.jit(experts, compiler_options=experts.compiler_options).lower(
            *moe_layer_args(cfg, experts, tokens)).compile()
        text = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - a failed build is a result
        build.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return build
    finally:
        build.compile_s = round(time.perf_counter() - start, 2)
    build.report = hlo_report.report(text)
    build.backends = sorted(set(_gemm_targets(text)))
    return build


def _gemm_targets(hlo_text: str) -> list[str]:
    import re

    return re.findall(r'custom_call_target="(mosaic_gpu\w*|__gpu\$xla\.gpu\.triton|__cublas\$\w+|'
                      r'triton_kernel_call)"', hlo_text)


# A whole prefill --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrefillBuild:
    model: str
    rule_set: str
    mesh: dict
    batch: int
    seq_len: int
    plan: str
    backends: list[str]
    async_collectives: int = 0
    sync_collectives: int = 0
    host_transfers: list[str] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    error: str = ""


def prefill_build(devices, cfg: ModelConfig, rule_set: str, *, batch: int = 8, seq_len: int = 512,
                  plan: sharding.ExpertPlan | None = None) -> PrefillBuild:
    """Compiles the Engine's prefill of a whole model (abstract parameters in their shards) for the
    compile-only ``devices`` under ``rule_set``; counts the collectives XLA made asynchronous."""
    from epsjax import engine

    shape = placement.default_mesh_shape(rule_set, cfg, len(devices))
    mesh = sharding.make_mesh(**shape, devices=devices)
    plan = plan or sharding.ExpertPlan()
    build = PrefillBuild(cfg.name, rule_set, shape, batch, seq_len, repr(plan), [])
    start = time.perf_counter()
    try:
        graphdef, abstract, shardings = placement.abstract_shardings(cfg, mesh, rule_set)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        experts = (sharding.EPExperts(mesh=mesh, rule_set=rule_set, plan=plan) if rule_set.endswith("_ep")
                   else sharding.EPExperts(mesh=mesh, rule_set=rule_set))
        tokens_sharding = sharding.batch_sharding(mesh, rule_set)
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=tokens_sharding)
        mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=tokens_sharding)
        text = engine.lower_prefill(graphdef, params, tokens, mask, experts=experts, cache_len=seq_len).compile(
        ).as_text()
    except Exception as e:  # noqa: BLE001 - a failed build is a result
        build.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return build
    finally:
        build.compile_s = round(time.perf_counter() - start, 2)
    report = hlo_report.report(text)
    build.backends = sorted(set(_gemm_targets(text)))
    build.async_collectives = len(report.async_pairs)
    build.sync_collectives = sum(1 for c in report.collectives if "-start" not in c)
    build.host_transfers = report.host_transfers
    return build
