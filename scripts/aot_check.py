"""Build every GPU program of epsjax for Hopper on a machine without a GPU, and report what the compilers say.

    .venv/bin/pip install -e ".[aot]"        # the CUDA plugin wheels, triton and jax-triton (CPU machine is fine)
    .venv/bin/python scripts/aot_check.py    # H100, every kernel x tiling x model, EP layers, whole prefills
    .venv/bin/python scripts/aot_check.py --quick --out /tmp/aot.json   # the CI subset (tests/test_aot.py)

Needs a CUDA toolkit's ptxas (on PATH or in /usr/local/cuda/bin). Builds, for compile-only devices of
--target (pallas_kernels.targets):

1. kernels: the fused gate/up and the down kernel of mosaic_gpu, pallas_triton and jax_triton at the expert
   shapes of Mixtral-8x7B, DeepSeek-V2 and DeepSeek-V2-Lite, for every tiling the selector may pick
   (pallas_kernels.selector.candidate_tilings): registers, spills, serialized wgmma (ptxas C7511), and the Mosaic
   resource model's accumulator registers and shared memory; with --refused, also the Mosaic tilings the
   resource model refuses (to show what they would cost);
2. the EP MoE layer (DeepSeek-V2-Lite sizes, 8 devices) for each EP rule set, pipeline degree, split and
   transport: which collectives XLA:GPU made asynchronous, which GEMM kernels it placed between each start and
   done, stage independence, host transfers;
3. a whole-model prefill (DeepSeek-V2-Lite, first 2 layers) per rule set.

Writes JSON as it goes (default scripts/results/aot_<target>.json) and prints tables. Proves the programs build
for sm_90a and what ptxas allocates; cannot time anything, and XLA has no autotuning results without a device.
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: compile-only GPU devices on a CPU host, and ptxas reports on our file descriptors.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.update({"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "subprocess_compilation=2",
                   "MOSAIC_GPU_DUMP_PTXAS": "1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"})  # over a parent's values

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from epsjax import sharding  # noqa: E402
from epsjax import aot  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402
from epsjax.models import get_preset  # noqa: E402
from epsjax.pallas_kernels import group_gemm_mgpu, targets  # noqa: E402

EP_MODEL = "deepseek-v2-lite"
EP_PLANS = (sharding.ExpertPlan(1), sharding.ExpertPlan(2, "experts"), sharding.ExpertPlan(4, "experts"),
            sharding.ExpertPlan(2, "tokens"))
QUICK_EP = (("dp_ep", sharding.ExpertPlan(2, "experts"), "ragged"), ("dp_ep", sharding.ExpertPlan(4, "experts"),
                                                                      "ragged"),
            ("dp_ep", sharding.ExpertPlan(2, "tokens"), "ragged"), ("tp_ep", sharding.ExpertPlan(2, "experts"),
                                                                    "ragged"),
            ("dp_ep", sharding.ExpertPlan(2, "experts"), "padded"))
REFUSED_MOSAIC = (group_gemm_mgpu.MosaicTiling(128, 256, 64, 4), group_gemm_mgpu.MosaicTiling(256, 256, 64, 4),
                  group_gemm_mgpu.MosaicTiling(128, 192, 64, 4, consumers=1),
                  group_gemm_mgpu.MosaicTiling(128, 256, 128, 4))




def refused_builds(device, model: str, tokens: int) -> list[aot.KernelBuild]:
    """Mosaic tilings the resource model refuses, built anyway (through the kernel's internal entry point) to
    show the spills it avoids."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    cfg = get_preset(model)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim
    mesh = Mesh(np.array([device]), ("x",))
    rep = NamedSharding(mesh, P())
    out = []
    for tiling in REFUSED_MOSAIC:
        for op, (k, n), weights in (("gate_up", (D, F), 2), ("down", (F, D), 1)):
            resources = group_gemm_mgpu.resources(tiling, 2, weights)
            if (resources.fits_registers and resources.stages > 1) or n % tiling.block_n:
                continue
            build = aot.KernelBuild("mosaic_gpu", op, model, tokens, k, n, E, repr(tiling) + " (refused)",
                                    accumulator_registers=resources.accumulator_registers,
                                    accumulator_budget=resources.accumulator_budget, smem_bytes=resources.smem_bytes)
            x = jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16, sharding=rep)
            w = jax.ShapeDtypeStruct((E, k, n), jnp.bfloat16, sharding=rep)
            sizes = jax.ShapeDtypeStruct((E,), jnp.int32, sharding=rep)

            def fn(a, *rest, tiling=tiling, weights=weights):
                *ws, g = rest
                slots = jnp.arange(E, dtype=jnp.int32)
                return group_gemm_mgpu._call(a, tuple(ws), g, slots, tiling=tiling, interpret=False)

            start = time.perf_counter()
            with targets.capture_native_output() as captured, jax.set_mesh(mesh):
                jax.jit(fn).lower(x, *([w] * weights), sizes).compile()
            build.compile_s = round(time.perf_counter() - start, 2)
            kernel = targets.ptxas_report(captured[0]).get(aot._KERNEL_NAMES[("mosaic_gpu", op)])
            if kernel:
                build.registers, build.serialized_wgmma = kernel.registers, kernel.serialized_wgmma
                build.spill_store_bytes, build.spill_load_bytes = kernel.spill_store_bytes, kernel.spill_load_bytes
            out.append(build)
    return out


def short(tiling: str) -> str:
    """MosaicTiling(block_m=128, block_n=256, block_k=64, max_concurrent_steps=4, num_sms=None, grid_band=0,
    consumers=2) -> 128x256x64 s4 c2."""
    values = re.findall(r"=(\w+)", tiling)
    if tiling.startswith("MosaicTiling"):
        band = "" if len(values) < 6 or values[5] == "0" else f" band {values[5]}"
        consumers = f" c{values[6]}" if len(values) > 6 else ""
        return f"{'x'.join(values[:3])} s{values[3]}{consumers}" + ("" if values[4] == "None" else
                                                                    f" {values[4]} SMs") + \
            band + tiling[tiling.index(")") + 1:]
    if tiling.startswith("TritonTiling"):
        return f"{'x'.join(values[:3])} w{values[3]} s{values[4]}"
    return tiling


def kernel_table(builds) -> str:
    lines = ["backend | op | model | tiling | regs | spill st/ld bytes | serialized wgmma | acc regs (model) | "
             "smem KiB (model) | compile s", "--- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for b in builds:
        smem = f"{b.smem_bytes / 1024:.0f}" if b.smem_bytes else "-"
        regs = b.registers if b.registers is not None else f"ERROR {b.error[:60]}"
        lines.append(f"{b.backend} | {b.op} | {b.model} | {short(b.tiling)} | {regs} | {b.spill_store_bytes}/"
                     f"{b.spill_load_bytes} | {'YES' if b.serialized_wgmma else 'no'} | "
                     f"{b.accumulator_registers if b.accumulator_registers is not None else '-'} | {smem} | "
                     f"{b.compile_s}")
    return "\n".join(lines)


def ep_table(builds) -> str:
    lines = ["rule set | mesh | PN | split | transport | GEMM kernels | async collectives | stage overlap "
             "(collective: another stage's GEMM in flight) | independent | host transfers | compile s",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for b in builds:
        if b.error:
            lines.append(f"{b.rule_set} | {b.mesh} | {b.pipeline_degree} | {b.split} | {b.transport} | ERROR "
                         f"{b.error[:100]}")
            continue
        r = b.report
        overlap = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in b.stage_overlap().items()) or "-"
        mesh = ",".join(str(b.mesh.get(a, 1)) for a in ("data", "tensor", "expert"))
        lines.append(f"{b.rule_set} | {mesh} | {b.pipeline_degree} | {b.split} | {b.transport} | "
                     f"{','.join(b.backends) or 'XLA'} | {len(r.async_pairs)} of {len(r.collectives)} | {overlap} | "
                     f"{'yes' if not (r.dispatch_violations or r.return_violations) else 'NO'} | "
                     f"{', '.join(r.host_transfers) or 'none'} | {b.compile_s}")
    return "\n".join(lines)


def prefill_table(builds) -> str:
    lines = ["rule set | mesh | batch x seq | GEMM kernels | async / sync collectives | host transfers | compile s",
             "--- | --- | --- | --- | --- | --- | ---"]
    for b in builds:
        if b.error:
            lines.append(f"{b.rule_set} | {b.mesh} | ERROR {b.error[:120]}")
            continue
        mesh = ",".join(str(b.mesh.get(a, 1)) for a in ("data", "tensor", "expert"))
        lines.append(f"{b.rule_set} | {mesh} | {b.batch}x{b.seq_len} | {','.join(b.backends) or 'XLA'} | "
                     f"{b.async_collectives} / {b.sync_collectives} | {', '.join(b.host_transfers) or 'none'} | "
                     f"{b.compile_s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="h100", choices=sorted(targets.TARGETS))
    parser.add_argument("--quick", action="store_true", help="the CI subset: Mixtral kernels, 5 EP layers, "
                                                             "one prefill")
    parser.add_argument("--refused", action="store_true", help="also build the Mosaic tilings the resource "
                                                               "model refuses")
    parser.add_argument("--models", default=None, help="comma-separated presets for the kernel builds")
    parser.add_argument("--out", default=None, help="JSON path (default scripts/results/aot_<target>.json)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: kernels,ep,prefill")
    args = parser.parse_args(argv)

    why_not = targets.aot_available()
    if why_not:
        print(f"aot_check: cannot build for a GPU here: {why_not}", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    devices = targets.compile_only_devices(args.target, 8)
    out = Path(args.out or ROOT / "scripts" / "results" / f"aot_{args.target}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(target=args.target, device_kind=devices[0].device_kind, arch=targets.get_target(args.target).arch,
                  jax=jax.__version__, commit=git_commit(), host=platform.node(), quick=args.quick,
                  ptxas=targets.ptxas_path(),
                  mosaic_accumulator_budget={c: group_gemm_mgpu.accumulator_budget(c) for c in (1, 2)},
                  kernels=[], ep_layers=[], prefills=[])

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))

    started = time.perf_counter()
    kernels = []
    if "kernels" not in skip:
        models = args.models.split(",") if args.models else (["mixtral-8x7b"] if args.quick else aot.KERNEL_MODELS)
        with tqdm(desc="kernels", unit="build") as bar:
            def progress(build):
                bar.update()
                bar.set_postfix_str(f"{build.backend} {build.op} {build.model}")

            for model in models:
                kernels += aot.kernel_builds(devices[0], model, progress=progress)
                result["kernels"] = [dataclasses.asdict(b) | {"clean": b.clean} for b in kernels]
                save()
        if args.refused:
            for model in models:
                kernels += refused_builds(devices[0], model, 4096)
            result["kernels"] = [dataclasses.asdict(b) | {"clean": b.clean} for b in kernels]
            save()
        print(kernel_table(kernels))

    ep_builds = []
    if "ep" not in skip:
        cfg = get_preset(EP_MODEL)
        configs = QUICK_EP if args.quick else [(r, p, t) for r in ("tp_ep", "dp_ep") for t in ("ragged", "padded")
                                               for p in EP_PLANS]
        for rule_set, plan, transport in tqdm(configs, desc="EP layers", unit="build"):
            ep_builds.append(aot.ep_layer_build(devices, cfg, rule_set, plan, transport))
            result["ep_layers"] = [b.to_json() for b in ep_builds]
            save()
        print(ep_table(ep_builds))

    prefills = []
    if "prefill" not in skip:
        cfg = get_preset(EP_MODEL, num_layers=2)
        rule_sets = ("dp_ep",) if args.quick else ("tp", "dp", "tp_ep", "dp_ep")
        for rule_set in tqdm(rule_sets, desc="prefills", unit="build"):
            plan = sharding.ExpertPlan(2, "experts") if rule_set.endswith("_ep") else None
            prefills.append(aot.prefill_build(devices, cfg, rule_set, plan=plan))
            result["prefills"] = [dataclasses.asdict(b) for b in prefills]
            save()
        print(prefill_table(prefills))

    result["seconds"] = round(time.perf_counter() - started, 1)
    save()
    dirty = [b for b in kernels if not b.clean and not b.tiling.endswith("(refused)")]
    no_overlap = [b for b in ep_builds if b.error or b.pipelined() is False]
    failed = [b for b in prefills if b.error]
    print(f"wrote {out} in {result['seconds']} s: {len(kernels)} kernel builds ({len(dirty)} with spills, "
          f"serialized wgmma or errors), {len(ep_builds)} EP layers ({len(no_overlap)} failed, or "
          f"pipelined on the GPU transport without a dispatch overlapping another stage's GEMMs), "
          f"{len(prefills)} prefills ({len(failed)} failed)")
    return 1 if dirty or no_overlap or failed else 0


if __name__ == "__main__":
    sys.exit(main())
