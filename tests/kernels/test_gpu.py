"""GPU paths: compiled kernels (marked gpu) and their lowerings (run on CPU).

The compiled tests need a CUDA GPU and skip without one.  tests/conftest.py
defaults JAX_PLATFORMS to cpu, so on a GPU machine run them with
``JAX_PLATFORMS=cuda,cpu .venv/bin/pytest -m gpu tests/kernels``.

Without a GPU, the Pallas kernels are still lowered for an abstract H100
(Pallas -> Triton IR and Pallas -> Mosaic GPU MLIR run on the host), and the
jax-triton kernel is compiled to an sm_90 cubin by triton when triton imports;
what stays untested without a GPU is XLA's final compile and the run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels import group_gemm_jax_triton, group_gemm_mgpu, group_gemm_triton, selector, targets
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling
from epsjax.pallas_kernels.group_gemm_triton import TritonTiling
from epsjax.pallas_kernels.timing import best_seconds

from . import kernel_cases as kc

NO_GPU = "no CUDA GPU here: compiled Pallas / Triton kernels run only on a GPU"
requires_gpu = pytest.mark.skipif(not kc.on_gpu(), reason=NO_GPU)


def _is_hopper():
    return kc.on_gpu() and targets.is_hopper_kind(jax.devices()[0].device_kind)  # H100, H800, H200, H20


# ---------------------------------------------------------------- compiled, GPU


GPU_CASES = [
    ("pallas_triton", TritonTiling(64, 64, 32)),
    ("mosaic_gpu", MosaicTiling(128, 128, 64, 4)),
    ("mosaic_gpu", MosaicTiling(64, 128, 64, 3, num_sms=16)),  # SMs left to communication
    ("mosaic_gpu", None),  # the defaults: 128x128 fused gate/up, 128x256 down (two consumer warpgroups)
    ("mosaic_gpu", MosaicTiling(128, 128, 128, 3, consumers=1)),  # block_k 128, one consumer
    ("jax_triton", TritonTiling(64, 128, 64)),
]
GPU_LOADS = {
    "balanced": [96] * 8,
    "skewed_with_zeros": [0, 700, 3, 0, 1, 64, 0, 0],
    "all_to_one": [0, 0, 0, 768, 0, 0, 0, 0],
}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend,tiling", GPU_CASES, ids=str)
@pytest.mark.parametrize("load", sorted(GPU_LOADS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compiled_group_gemm(backend, tiling, load, dtype):
    if backend == "mosaic_gpu" and not _is_hopper():
        pytest.skip("mosaic_gpu needs an sm_90 (Hopper) GPU")
    if backend == "jax_triton" and not group_gemm_jax_triton.importable():
        pytest.skip("jax_triton / triton do not import: pip install 'epsjax[gpu]'")
    sizes = np.asarray(GPU_LOADS[load], np.int32)
    m = 800  # 32 padding rows
    lhs, rhs = kc.random_operands(0, m, 256, 512, 8, dtype)
    for kw in ({}, {"group_offset": 3}, {"slot_of_expert": jnp.array([7, -1, 0, 1, 2, 3, -1, 4], jnp.int32)}):
        out = pk.group_gemm(lhs, rhs[:5] if "group_offset" in kw else rhs, jnp.asarray(sizes),
                            backend=backend, tiling=tiling, **kw)
        slots = kc.expected_slots(8, 5 if "group_offset" in kw else 8, kw.get("group_offset", 0),
                                  kw.get("slot_of_expert"))
        kc.assert_close(out, kc.oracle_group_gemm(lhs, rhs[:5] if "group_offset" in kw else rhs, sizes, slots),
                        dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend,tiling", GPU_CASES, ids=str)
def test_compiled_expert_ffn(backend, tiling):
    if backend == "mosaic_gpu" and not _is_hopper():
        pytest.skip("mosaic_gpu needs an sm_90 (Hopper) GPU")
    if backend == "jax_triton" and not group_gemm_jax_triton.importable():
        pytest.skip("jax_triton / triton do not import: pip install 'epsjax[gpu]'")
    sizes = np.asarray(GPU_LOADS["skewed_with_zeros"], np.int32)
    x, w_gate, w_up, w_down = kc.random_ffn_operands(1, 800, 256, 384, 8, "bfloat16")
    out = pk.expert_ffn(x, w_gate, w_up, w_down, jnp.asarray(sizes), backend=backend, tiling=tiling)
    expected = kc.oracle_expert_ffn(x, w_gate, w_up, w_down, sizes, kc.expected_slots(8, 8))
    kc.assert_close(out, expected, "bfloat16", kc.FFN_TOLERANCE)


@pytest.mark.gpu
@requires_gpu
def test_auto_on_gpu_picks_a_compiled_backend():
    choice = pk.select_backend(tokens_per_expert=128, num_experts=8, k=256, n=384, dtype=jnp.bfloat16)
    assert choice.backend in ("mosaic_gpu", "pallas_triton", "jax_triton", "ragged_dot", "dense")


@pytest.mark.gpu
@requires_gpu
def test_group_gemm_reaches_half_the_dense_rate_at_a_large_balanced_load():
    """A floor, measured against the vendor GEMM in the same run: the grouped GEMM the selector picks for Mixtral's
    gate projection (8 experts x 2048 balanced tokens, K 4096, N 14336, bf16) runs at >= 50% of the TFLOP/s of one
    dense [16384, 4096] x [4096, 14336] matmul. (The GroupGemm v2 target, issue 13: 80%, read off profile_gemm.py.)"""
    if not _is_hopper():
        pytest.skip("the floor is set for Hopper")
    m, k, n, e = 16384, 4096, 14336, 8
    key = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(key[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(key[1], (e, k, n), jnp.bfloat16) / 64
    dense_rhs = rhs[0]
    sizes = jnp.full((e,), m // e, jnp.int32)
    grouped = best_seconds(jax.jit(lambda a, b, g: pk.group_gemm(a, b, g)), lhs, rhs, sizes, repeats=10)
    dense = best_seconds(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)),
                         lhs, dense_rhs, repeats=10)
    ratio = dense / grouped
    print(f"grouped {2 * m * k * n / grouped / 1e12:.0f} TFLOP/s, dense {2 * m * k * n / dense / 1e12:.0f} TFLOP/s, "
          f"ratio {ratio:.2f}")
    assert ratio >= 0.5, ratio


# ------------------------------------------------------------- lowering, on CPU

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"))


def _lower_for_h100(fn, *args):
    with jax.sharding.use_abstract_mesh(H100):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("module,tiling,target", [
    (group_gemm_triton, TritonTiling(64, 128, 64), "__gpu$xla.gpu.triton"),
    (group_gemm_mgpu, MosaicTiling(128, 128, 64, 4), "mosaic_gpu"),
    (group_gemm_mgpu, MosaicTiling(64, 128, 64, 2, num_sms=100), "mosaic_gpu"),
], ids=["pallas_triton", "mosaic_gpu", "mosaic_gpu_100_sms"])
def test_lowers_for_h100(module, tiling, target):
    x = jnp.zeros((300, 512), jnp.bfloat16)
    w = jnp.zeros((8, 512, 256), jnp.bfloat16)
    w_down = jnp.zeros((8, 256, 512), jnp.bfloat16)
    sizes = jnp.full((8,), 30, jnp.int32)
    text = _lower_for_h100(lambda a, b, g: module.group_gemm(a, b, g, tiling=tiling), x, w, sizes)
    assert f"custom_call @{target}" in text
    text = _lower_for_h100(
        lambda a, b, c, d, g: module.expert_ffn(a, b, c, d, g, group_offset=jnp.int32(0), tiling=tiling),
        x, w, w, w_down, sizes)
    assert text.count(f"custom_call @{target}") == 2  # fused gate/up, then down


@pytest.mark.parametrize("fused", [False, True])
def test_triton_kernel_compiles_for_sm90(fused):
    pytest.importorskip("triton", reason="triton is not installed (it comes with the gpu and aot extras)")
    ptx = group_gemm_jax_triton.ptx(1000, 5120, 1536, jnp.bfloat16, TritonTiling(64, 128, 64), fused=fused)
    assert "wgmma" in ptx  # Hopper tensor-core path


def test_gpu_only_backends_refuse_cpu_without_interpret():
    if kc.on_gpu():
        pytest.skip("this checks the CPU error message")
    lhs, rhs = kc.random_operands(0, 16, 64, 64, 2, "bfloat16")
    sizes = jnp.array([8, 8], jnp.int32)
    for backend in ("pallas_triton", "mosaic_gpu", "jax_triton"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            pk.group_gemm(lhs, rhs, sizes, backend=backend)
    with pytest.raises(ValueError, match="interpret"):
        pk.group_gemm(lhs, rhs, sizes, backend="jax_triton", interpret=True)


@pytest.mark.parametrize("tiling", [MosaicTiling(128, 128, 64, 8), MosaicTiling(64, 256, 64, 8),
                                    MosaicTiling(64, 128, 64, 12, consumers=1)], ids=str)
def test_mosaic_stages_fit_shared_memory(tiling):
    # fit_stages drops pipeline stages until Mosaic GPU's own shared-memory check passes at lowering.
    x = jnp.zeros((256, 512), jnp.bfloat16)
    w = jnp.zeros((8, 512, 256), jnp.bfloat16)
    sizes = jnp.full((8,), 32, jnp.int32)
    _lower_for_h100(lambda a, b, c, g: group_gemm_mgpu.gate_up(a, b, c, g, tiling=tiling), x, w, w, sizes)
    fitted = group_gemm_mgpu.fit_stages(tiling, 2, 2)
    assert 2 <= fitted.max_concurrent_steps < tiling.max_concurrent_steps
    assert group_gemm_mgpu.smem_bytes(fitted, 2, 2) <= group_gemm_mgpu.MAX_SMEM_BYTES


# ------------------------------------------------------- resources, without compiling

def test_mosaic_resource_model_refuses_what_spills():
    # A consumer warpgroup holds block_m * block_n / consumers / 128 float32 accumulator registers per thread
    # per weight. ptxas (sm_90a, scripts/aot_check.py --refused) spills above 128 of them with two consumers
    # (232 registers each) and at 192 with one (248).
    resources = group_gemm_mgpu.resources
    assert resources(MosaicTiling(128, 256), 2, 1).accumulator_registers == 128
    assert resources(MosaicTiling(128, 128), 2, 2).accumulator_registers == 128
    assert resources(MosaicTiling(128, 256), 2, 2).accumulator_registers == 256
    assert resources(MosaicTiling(128, 128, consumers=1), 2, 2).accumulator_registers == 256
    assert group_gemm_mgpu.consumer_registers(2) == 232 and group_gemm_mgpu.consumer_registers(1) == 248
    assert 128 <= group_gemm_mgpu.accumulator_budget(2) < 256
    assert 128 <= group_gemm_mgpu.accumulator_budget(1) < 192
    assert group_gemm_mgpu.default_tiling(1) == MosaicTiling(128, 256)
    assert group_gemm_mgpu.default_tiling(1, n=384) == MosaicTiling(128, 128)  # N not a multiple of 256
    assert group_gemm_mgpu.default_tiling(2, n=192) == MosaicTiling(128, 64, consumers=1)  # nor of 128
    assert group_gemm_mgpu.default_tiling(2) == MosaicTiling(128, 128)
    with pytest.raises(ValueError, match=r"256 float32 accumulator registers per consumer thread in the fused"):
        group_gemm_mgpu.check_tiling(MosaicTiling(128, 256), jnp.bfloat16, 4096, 14336, num_weights=2)
    with pytest.raises(ValueError, match=r"192 float32 accumulator registers per consumer thread in the kernel"):
        group_gemm_mgpu.check_tiling(MosaicTiling(128, 192, consumers=1), jnp.bfloat16, 4096, 14592)
    with pytest.raises(ValueError, match=r"fits one pipeline stage"):  # 96 KiB stages + 64 KiB of epilogue
        group_gemm_mgpu.check_tiling(MosaicTiling(128, 256, 128), jnp.bfloat16, 14336, 4096)
    with pytest.raises(ValueError, match=r"block_n must be a multiple of 128 .* with 2 consumer"):
        MosaicTiling(128, 64)
    assert group_gemm_mgpu.check_tiling(None, jnp.bfloat16, 4096, 14336, num_weights=2) == MosaicTiling(128, 128)
    assert group_gemm_mgpu.supports(jnp.bfloat16, 4096, 14336, MosaicTiling(128, 256))
    assert not group_gemm_mgpu.supports(jnp.bfloat16, 4096, 14336, MosaicTiling(128, 256), op="expert_ffn")
    # Every candidate the selector may pick for a kernel fits the model (the AOT test checks ptxas agrees).
    for tiling in selector.candidate_tilings("mosaic_gpu"):
        assert resources(tiling or MosaicTiling(), 2, 1).fits_registers


PTXAS_OUTPUT = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 772 by compiler to allow use of registers in GMMA in function 'gate_up_mosaic_gpu_kernel'
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'gate_up_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'gate_up_mosaic_gpu_kernel', 896 bytes spill stores, 896 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gate_up_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for gate_up_mosaic_gpu_kernel
    528 bytes stack frame, 896 bytes spill stores, 896 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 528 bytes cumulative stack size, 1 bytes smem
I1129 19:18:37.503485    3748 subprocess_compilation.cc:356] ptxas info    : 64 bytes gmem
ptxas info    : Compiling entry function 'loop_compare_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_compare_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
"""


def test_ptxas_report_reads_registers_spills_and_serialization():
    report = targets.ptxas_report(PTXAS_OUTPUT)
    assert set(report) == {"gate_up_mosaic_gpu_kernel", "loop_compare_fusion"}
    fused = report["gate_up_mosaic_gpu_kernel"]
    assert (fused.registers, fused.spill_store_bytes, fused.spill_load_bytes, fused.stack_bytes) == (255, 896, 896, 528)
    assert fused.serialized_wgmma and fused.injected_arrives and fused.spills
    plain = report["loop_compare_fusion"]
    assert (plain.registers, plain.spills, plain.serialized_wgmma) == (10, False, False)


def test_target_config_carries_the_device_facts():
    text = targets.target_config("h200")
    assert 'name: "NVIDIA H200"' in text and "core_count: 132" in text and "memory_bandwidth: 4800000000000" in text
    assert targets.target_for_kind("NVIDIA H200") is targets.TARGETS["h200"]
    assert targets.target_for_kind("NVIDIA H20") is targets.TARGETS["h20"]
    assert targets.target_for_kind("NVIDIA H800") is targets.TARGETS["h800"]
    assert targets.target_for_kind("NVIDIA A100-SXM4-80GB") is None
    assert all(targets.is_hopper_kind(t.device_kind) for t in targets.TARGETS.values())
