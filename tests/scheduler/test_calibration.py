"""Calibration: scripts/gpu_check.py --cpu measures this machine's constants, the cost models read them, and plans
follow them (issue 14, CPU part)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from epsjax.scheduler import CostModel, predict_prefill, search_for
from epsjax.scheduler.calibration import FIELDS, calibrated, calibration_path, load_calibration
from epsjax.scheduler.hardware import hardware_for_device_kind
from epsjax.models import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"
EP8 = {"data": 1, "tensor": 1, "expert": 8}


@pytest.fixture(scope="module")
def cpu_calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--quick", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def test_gpu_check_cpu_writes_every_constant(cpu_calibration):
    out, stdout = cpu_calibration
    cal = load_calibration("cpu", out)
    assert set(FIELDS) <= set(cal) and cal["devices"] == 8
    assert cal["dense_tflops"]["float32"] > 0 and cal["memory_gbs"] > 0 and 0 < cal["attention_efficiency"] < 2
    assert cal["link_gbs"] > 0 and cal["dispatch_latency_s"] > 0 and cal["host_to_device_gbs"] > 0
    assert "all_to_all over 8 devices" in stdout and "host -> device copy" in stdout and "wrote" in stdout


def test_the_cpu_plans_from_its_calibration(cpu_calibration):
    out, _ = cpu_calibration
    assert hardware_for_device_kind("cpu", out / "absent") is None  # no calibration: no cost model on CPU
    hw = hardware_for_device_kind("cpu", out)
    cal = load_calibration("cpu", out)
    assert hw.peak_flops("float32") == pytest.approx(cal["dense_tflops"]["float32"] * 1e12)
    assert not hw.async_collectives  # XLA:CPU's collectives are synchronous: they take the compute stream
    costs = CostModel.build(hw, "float32")
    sources = dict(costs.sources)
    assert sources["memory"].startswith("calibrated") and sources["links"].startswith("calibrated")
    assert sources["host_copies"].startswith("calibrated")  # what an offloaded expert's load costs
    assert costs.host_to_device(1e9) == pytest.approx(hw.kernel_latency_s + 1 / cal["host_to_device_gbs"])
    assert "fitted from cpu.json" in sources["gemm:dense"]  # the CPU profile table, for the CPU only
    cfg = get_preset("tiny-mixtral")
    choice = search_for(cfg, EP8, 8, 32, hardware=hw, rule_set="dp_ep")
    assert choice is not None and choice.plan.pipeline_degree == 1  # nothing overlaps on CPU: no pipeline pays
    seconds, _ = predict_prefill(cfg, EP8, 8, 32, choice.plan, hardware=hw, rule_set="dp_ep")
    assert seconds > 0


def _h100_calibration(directory, link_gbs):
    calibration_path(H100, directory).parent.mkdir(parents=True, exist_ok=True)
    calibration_path(H100, directory).write_text(json.dumps(dict(
        device_kind=H100, dense_tflops={"bfloat16": 700.0}, memory_gbs=2900.0, attention_efficiency=0.35,
        link_gbs=link_gbs, link_latency_s=20e-6, dispatch_latency_s=5e-6, devices=8, cores=132, memory_gb=80)))
    return hardware_for_device_kind(H100, directory)


def test_a_plan_follows_the_calibration(tmp_path):
    cfg = get_preset("deepseek-v2-lite")
    slow = search_for(cfg, EP8, 8, 4096, hardware=_h100_calibration(tmp_path / "slow", 1.0), rule_set="dp_ep")
    fast = search_for(cfg, EP8, 8, 4096, hardware=_h100_calibration(tmp_path / "fast", 1000.0), rule_set="dp_ep")
    assert slow.plan != fast.plan and slow.predicted_s > 10 * fast.predicted_s
    assert dict(fast.sources)["links"].startswith("calibrated")
    preset = hardware_for_device_kind(H100, tmp_path / "none")
    assert not any(v.startswith("calibrated") for v in dict(preset.sources).values())


def test_a_calibration_missing_a_field_is_an_error(tmp_path):
    calibration_path("cpu", tmp_path).write_text(json.dumps({"device_kind": "cpu"}))
    with pytest.raises(ValueError, match=r"calibration lacks \['dense_tflops'"):
        calibrated(None, "cpu", tmp_path)


def test_presets_named_directly_read_a_matching_calibration(tmp_path):
    """simulate_eps --hardware h800 and FinDEP's testbeds name presets: a calibration whose device kind the preset's
    pattern matches applies to them too."""
    from epsjax.scheduler.hardware import get_hardware

    assert get_hardware("h100", tmp_path).peak_flops("bfloat16") == 989.4e12  # no calibration: the datasheet
    _h100_calibration(tmp_path, 100.0)
    hw = get_hardware("h100", tmp_path)
    assert hw.peak_flops("bfloat16") == 700e12 and hw.intra_node_per_direction == 100e9
    assert get_hardware("h800", tmp_path).peak_flops("bfloat16") == 989.4e12  # another kind: untouched
