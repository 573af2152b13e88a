"""Building for Hopper on this CPU machine (the aot extra: CUDA plugin wheels, triton, jax-triton; a CUDA
toolkit's ptxas).

The ptxas-based checks read scripts/aot_check.py --quick's JSON, run once in a subprocess: XLA's ptxas reports
only reach a process that set TF_CPP_* before importing jax. The rest run here, on compile-only devices.

Skipped where the aot extra or ptxas is missing, except in CI (CI set), where that is a failure.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from epsjax import pallas_kernels as pk
from epsjax import sharding
from epsjax import aot
from epsjax.pallas_kernels import group_gemm_mgpu, targets

ROOT = pathlib.Path(__file__).resolve().parents[2]
WHY_NOT = targets.aot_available()
if WHY_NOT and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the AOT checks, but {WHY_NOT}")
pytestmark = [pytest.mark.aot,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"cannot build for a GPU here: {WHY_NOT}")]


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stderr[-3000:]
    return json.loads(out.read_text()), done


def test_every_selectable_kernel_tiling_compiles_without_spills_or_serialized_wgmma(quick_check):
    result, _ = quick_check
    builds = result["kernels"]
    assert result["arch"] == "sm_90a" and builds
    dirty = [(b["backend"], b["op"], b["tiling"], b["registers"], b["spill_store_bytes"], b["serialized_wgmma"],
              b["error"]) for b in builds if not b["clean"]]
    assert dirty == []
    # Every tiling the selector can pick for each kernel was built (nothing skipped by accident).
    for backend in aot.KERNEL_BUILD_BACKENDS:
        for op, (k, n) in (("gate_up", (4096, 14336)), ("down", (14336, 4096))):
            expected = {"default" if t is None else repr(t) for t in aot.kernel_tilings(backend, op, k, n,
                                                                                        jnp.bfloat16)}
            built = {b["tiling"] for b in builds if b["backend"] == backend and b["op"] == op}
            assert built == expected, (backend, op)
    for b in builds:
        assert 0 < b["registers"] <= 255
        if b["backend"].startswith("mosaic_gpu"):
            assert b["accumulator_registers"] <= b["accumulator_budget"]
            assert b["smem_bytes"] <= group_gemm_mgpu.MAX_SMEM_BYTES


def test_ep_stages_overlap_on_the_gpu_target(quick_check):
    result, _ = quick_check
    layers = result["ep_layers"]
    assert layers and all(not layer["error"] for layer in layers)
    for layer in layers:
        report = layer["report"]
        assert report["host_transfers"] == []
        assert report["dispatch_violations"] == [] and report["return_violations"] == []
        assert layer["backends"] == ["mosaic_gpu_v2"]  # the selector picked the Hopper kernel, unpatched
        PN = layer["pipeline_degree"]
        if layer["transport"] == "ragged" and PN > 1:
            # Stage s's dispatch (s >= 1) is asynchronous with another stage's GEMM kernels in flight: stage 0's
            # dispatch has nothing to hide behind (every GEMM of the layer waits for some dispatch).
            dispatches = {k: v for k, v in layer["stage_overlap"].items() if k.startswith("ep_dispatch")}
            assert sorted(dispatches) == [f"ep_dispatch_{s}" for s in range(1, PN)]
            assert all(dispatches.values()) and layer["pipelined"], (PN, layer["split"], layer["stage_overlap"])
            assert len(report["async_pairs"]) == len(report["collectives"])  # every collective is async


def test_whole_prefill_builds_for_the_gpu_target(quick_check):
    result, _ = quick_check
    (prefill,) = result["prefills"]
    assert prefill["error"] == ""
    assert prefill["backends"] == ["mosaic_gpu_v2"]
    assert prefill["host_transfers"] == []
    assert prefill["async_collectives"] > 0


# On compile-only devices, in this process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def h100():
    return targets.compile_only_devices("h100", 8)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_compile_only_devices_of_every_target(name):
    target = targets.get_target(name)
    (device,) = targets.compile_only_devices(name, 1)
    assert device.device_kind == target.device_kind and device.platform == "gpu"
    with jax.set_mesh(Mesh(np.array([device]), ("x",))):
        current = targets.current()
    assert (current.platform, current.device_kind, current.num_cores) == ("gpu", target.device_kind,
                                                                          target.sm_count)
    assert current.is_hopper and current.compile_only
    assert targets.target_for_kind(device.device_kind) is target


def test_the_selector_builds_for_the_mesh_in_context(h100):
    kw = dict(tokens_per_expert=256, num_experts=8, k=4096, n=1792, dtype=jnp.bfloat16, op="expert_ffn")
    assert pk.select_backend(**kw).backend in ("dense", "chunked")  # the default device: this CPU
    mesh = Mesh(np.array(h100[:1]), ("x",))
    with jax.set_mesh(mesh):
        assert pk.select_backend(**kw).backend == "mosaic_gpu"
        rep = NamedSharding(mesh, P())
        x = jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16, sharding=rep)
        w = jax.ShapeDtypeStruct((8, 4096, 1792), jnp.bfloat16, sharding=rep)
        w_down = jax.ShapeDtypeStruct((8, 1792, 4096), jnp.bfloat16, sharding=rep)
        sizes = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep)
        text = jax.jit(lambda *a: pk.expert_ffn(*a, backend="auto")).lower(x, w, w, w_down, sizes).as_text()
    assert text.count("mosaic_gpu") >= 2  # fused gate/up, then down


def test_jax_triton_builds_for_a_compile_only_device(h100):
    pytest.importorskip("jax_triton", reason="the aot extra installs jax-triton")
    mesh = Mesh(np.array(h100[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=rep)
    w = jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16, sharding=rep)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rep)
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda a, b, g: pk.group_gemm(a, b, g, backend="jax_triton")).lower(x, w, sizes).compile()
    assert "triton_kernel_call" in compiled.as_text()


@pytest.mark.parametrize("backend", aot.GPU_BACKENDS)
def test_gpu_kernels_build_inside_shard_map(h100, backend):
    # Each device runs its 2 local experts (the EP MoE's call); the output type must carry the varying axes.
    if backend == "jax_triton":
        pytest.importorskip("jax_triton", reason="the aot extra installs jax-triton")
    mesh = Mesh(np.array(h100[:2]), ("expert",))
    lhs = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    rhs = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("expert")))
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=NamedSharding(mesh, P()))

    def local(lhs_MK, rhs_EKN, sizes_G):
        offset = jax.lax.axis_index("expert") * 2
        return pk.group_gemm(lhs_MK, rhs_EKN, sizes_G, group_offset=offset, backend=backend)[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert"), P()), out_specs=P("expert"))
    # tokamax reads the GPU architecture from the default device (on a GPU machine, the GPU).
    with jax.default_device(h100[0]):
        jax.jit(fn).lower(lhs, rhs, sizes).compile()


def test_ep_experts_ask_for_the_latency_hiding_scheduler_on_gpu(h100):
    gpu = sharding.EPExperts(mesh=sharding.make_mesh(expert=8, devices=h100), plan=sharding.ExpertPlan(2))
    cpu = sharding.EPExperts(mesh=sharding.make_mesh(expert=8), plan=sharding.ExpertPlan(2))
    assert gpu.resolved_transport == "ragged" and cpu.resolved_transport == "padded"
    assert gpu.compiler_options["xla_gpu_enable_latency_hiding_scheduler"] is True
    assert cpu.compiler_options == {}


def test_fp8_expert_ffn_builds_with_the_hopper_kernels(h100):
    """FP8 W8A8 experts on an H100: e4m3 weights in the program, the products through the Mosaic GroupGemm."""
    from epsjax.pallas_kernels import fp8

    mesh = Mesh(np.array(h100[:1]), ("x",))
    rep = NamedSharding(mesh, P())

    def placed(shape):
        q = jax.eval_shape(fp8.quantize_weights, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), q)

    x = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16, sharding=rep)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep)
    with jax.set_mesh(mesh):
        text = jax.jit(lambda *a: pk.expert_ffn(*a)).lower(
            x, placed((8, 1024, 1792)), placed((8, 1024, 1792)), placed((8, 1792, 1024)), sizes).compile().as_text()
    assert "f8e4m3fn" in text and "mosaic_gpu" in text


def test_tokamax_builds_its_hopper_kernel_for_a_compile_only_device(h100):
    from epsjax.pallas_kernels import tokamax_gemm

    mesh = Mesh(np.array(h100[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16, sharding=rep)
    w = jax.ShapeDtypeStruct((8, 1024, 1792), jnp.bfloat16, sharding=rep)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep)
    with jax.set_mesh(mesh), jax.default_device(h100[0]):  # tokamax reads the architecture from the default device
        text = jax.jit(lambda *a: pk.group_gemm(*a, backend="tokamax")).lower(x, w, sizes).compile().as_text()
    assert tokamax_gemm.implementation_here() is None  # outside the mesh: tokamax's own choice
    assert "mosaic_gpu" in text
