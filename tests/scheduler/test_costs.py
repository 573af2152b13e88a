"""Hardware presets, GEMM padding and fitting from profile tables, collectives: worked numbers."""

import json

import numpy as np
import pytest

from epsjax.scheduler.costs import CostModel, GemmModel, dense_capacity, fit_gemm_model, grouped_rows
from epsjax.scheduler.hardware import PRESETS, get_hardware, hardware_for_device_kind

PRESET_NAMES = ("h100", "h800", "h200", "h20", "a100", "a6000", "a10")


def test_presets_and_sources():
    assert set(PRESET_NAMES) <= set(PRESETS)
    for name in PRESET_NAMES:
        hw = get_hardware(name)
        sources = dict(hw.sources)
        assert "compute/memory/links" in sources and "sms" in sources, name
        assert hw.peak_flops("bfloat16") > 0 and hw.hbm_gbs > 0 and hw.sms > 0
    assert get_hardware("h800").nvlink_gbs == 400 and get_hardware("h100").nvlink_gbs == 900
    assert get_hardware("h800").peak_flops("bf16") == get_hardware("h100").peak_flops("bf16")
    assert get_hardware("h20").peak_flops("bfloat16") == 148e12 and get_hardware("h20").hbm_gbs == 4000
    assert get_hardware("a6000").nvlink_gbs == 0 and get_hardware("a10").nvlink_gbs == 0
    assert get_hardware("a10").intra_node_per_direction == 32e9  # PCIe Gen4 x16, one direction


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H800", "h800"), ("NVIDIA H200", "h200"), ("NVIDIA H20", "h20"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA RTX A6000", "a6000"), ("NVIDIA A10", "a10"), ("TPU v5", None)])
def test_device_kinds(kind, name):
    hw = hardware_for_device_kind(kind)
    assert (hw.name if hw else None) == name
    # The CPU has no preset: its cost model exists through its calibration (tests/scheduler/test_calibration.py).
    assert hardware_for_device_kind("cpu").name == "cpu"


def test_padding():
    # GroupGemm: 300 rows in 128-row tiles = 3 tiles, plus one more item per extra non-empty group (2 boundaries).
    assert grouped_rows(np.array([100, 0, 150, 50]), 128) == (3 + 2) * 128
    assert grouped_rows(np.array([0, 0]), 128) == 0
    # DenseGemm buckets as pallas_kernels.dense_gemm.DenseTiling: cdiv(M, S) * (1, 2, 4) rounded up to 8.
    from epsjax.pallas_kernels.dense_gemm import DenseTiling

    for rows in ([100, 100, 100, 100], [100, 0, 150, 50], [1, 1, 1, 397], [7, 9, 0, 0]):
        rows = np.array(rows)
        buckets = DenseTiling().buckets(int(rows.sum()), len(rows))
        fitting = [c for c in buckets if c >= rows.max()]
        assert dense_capacity(rows) == (fitting[0] if fitting else -(-rows.max() // 8) * 8)
    assert dense_capacity(np.array([30, 10]), capacities=(16, 32, 64)) == 32


def test_gemm_roofline_and_sm_scaling():
    costs = CostModel.build("h800", use_profiles=False)
    dense = costs.gemm_model("dense")
    # One 4096 x 4096 x 4096 bf16 GEMM: flops at 989.4 x 0.75 TFLOP/s + weights at 3350 x 0.85 GB/s + 4 us.
    t = dense.time(np.array([4096]), 4096, 4096, capacities=(4096,))
    expected = 4e-6 + 2 * 4096 ** 3 / (989.4e12 * 0.75) + 4096 * 4096 * 2 / (3350e9 * 0.85)
    assert t == pytest.approx(expected, rel=1e-9)
    # Half the SMs: the flop term doubles, the memory term (saturated at half the SMs) does not.
    half = dense.time(np.array([4096]), 4096, 4096, sm_fraction=0.5, capacities=(4096,))
    assert half == pytest.approx(expected + 2 * 4096 ** 3 / (989.4e12 * 0.75), rel=1e-9)
    # Efficiency rises with tokens per expert (the roofline smoothed).
    effs = [dense.efficiency(m, 5120, 1536, costs.peak, groups=8) for m in (16, 64, 256, 1024, 4096)]
    assert effs == sorted(effs) and effs[-1] < 0.75


def synthetic_table(tmp_path, alpha, beta, gamma, kind="NVIDIA H800", is_cpu=False):
    model = GemmModel("mosaic_gpu", "grouped", alpha, beta, gamma, 128)
    entries = []
    for e, k, n in ((16, 5120, 1536), (8, 4096, 14336)):
        for tpe in (16, 128, 512, 2048, 8192):
            rows = np.full(e, tpe)
            entries.append({"op": "group_gemm", "E": e, "K": k, "N": n, "dtype": "bfloat16", "load": "balanced",
                            "tokens_per_expert": tpe, "backend": "mosaic_gpu", "tiling": None,
                            "seconds": model.time(rows, k, n)})
            entries.append({"op": "expert_ffn", "E": e, "K": k, "N": n, "dtype": "bfloat16", "load": "balanced",
                            "tokens_per_expert": tpe, "backend": "mosaic_gpu", "tiling": None,
                            "seconds": model.ffn_time(rows, k, n)})
            entries.append({"op": "group_gemm", "E": e, "K": k, "N": n, "dtype": "bfloat16", "load": "skewed",
                            "tokens_per_expert": tpe, "backend": "mosaic_gpu", "seconds": 1.0})  # not fitted
    path = tmp_path / "nvidia_h800.json"
    path.write_text(json.dumps({"device_kind": kind, "platform": "cpu" if is_cpu else "gpu", "is_cpu": is_cpu,
                                "entries": entries}))
    return path


def test_fit_recovers_parameters(tmp_path):
    alpha, beta, gamma = 6e-6, 1 / (989.4e12 * 0.62), 2 / 3.0e12
    synthetic_table(tmp_path, alpha, beta, gamma)
    costs = CostModel.build("h800", profile_dir=tmp_path)
    fitted = costs.gemm_model("mosaic_gpu")
    assert fitted.alpha == pytest.approx(alpha, rel=1e-3)
    assert fitted.beta == pytest.approx(beta, rel=1e-6)
    assert fitted.gamma == pytest.approx(gamma, rel=1e-4)
    sources = dict(costs.sources)
    assert sources["gemm:mosaic_gpu"].startswith("fitted from nvidia_h800.json (20 points")
    assert sources["gemm:dense"].startswith("preset roofline")  # no dense entries: the preset stays


def test_cpu_and_foreign_tables_ignored(tmp_path):
    synthetic_table(tmp_path, 1e-5, 1e-14, 1e-12, is_cpu=True)
    assert dict(CostModel.build("h800", profile_dir=tmp_path).sources)["gemm:mosaic_gpu"].startswith("preset")
    synthetic_table(tmp_path, 1e-5, 1e-14, 1e-12, kind="NVIDIA A100-SXM4-80GB")
    assert dict(CostModel.build("h800", profile_dir=tmp_path).sources)["gemm:mosaic_gpu"].startswith("preset")
    assert fit_gemm_model([], "dense", "x") is None


def test_collectives():
    costs = CostModel.build("h800", use_profiles=False)
    link = 200e9 * 0.8  # H800 NVLink per direction x efficiency
    # Two GPUs swapping 1 GB each way: the latency plus 1 GB over one direction of the link.
    send = np.array([[0.0, 1e9], [1e9, 0.0]])
    assert costs.all_to_all(send) == pytest.approx(15e-6 + 1e9 / link)
    # The diagonal stays on the device; the busiest receiver sets the time.
    send = np.array([[5e9, 1e9, 0.0], [0.0, 0.0, 0.0], [0.0, 3e9, 0.0]])
    assert costs.all_to_all(send) == pytest.approx(15e-6 + 4e9 / link)
    # 8 SMs reach 8/20 of the link rate; nothing reserved (0) runs at the full rate.
    assert costs.all_to_all(send, sm_for_comm=8) == pytest.approx(15e-6 + 4e9 / (link * 0.4))
    assert costs.all_reduce(1e9, 8) == pytest.approx(15e-6 + 2 * 7 / 8 * 1e9 / link)
    assert costs.all_gather(1e9, 4) == pytest.approx(15e-6 + 3 / 4 * 1e9 / link)
    assert costs.all_reduce(1e9, 1) == 0.0
    # Across nodes the network (50 GB/s per GPU) is the bottleneck.
    assert costs.all_reduce(1e9, 16) == pytest.approx(25e-6 + 2 * 15 / 16 * 1e9 / (50e9 * 0.8))
    assert costs.host_to_device(64e9) == pytest.approx(4e-6 + 64e9 / (64e9 * 0.8))
    assert costs.send_recv(1e9) == pytest.approx(15e-6 + 1e9 / link)
    # PCIe-only A10: 32 GB/s per direction.
    a10 = CostModel.build("a10", use_profiles=False)
    assert a10.all_to_all(np.array([[0.0, 1e9], [1e9, 0.0]])) == pytest.approx(30e-6 + 1e9 / (32e9 * 0.8))
