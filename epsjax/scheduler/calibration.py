"""Measured constants for the cost models: one calibration file per device kind, written by scripts/gpu_check.py.

    python scripts/gpu_check.py            # on a lent GPU: writes calibrations/<device kind>.json
    python scripts/gpu_check.py --cpu      # this machine: calibrations/cpu.json (8 virtual devices)

A calibration holds what was measured (dense matmul TFLOP/s per dtype, memory bandwidth, attention efficiency,
all-to-all bandwidth and latency between the devices, dispatch latency of one small program, the GEMM profile table
to fit) with the host, jax version and commit. `calibrated(hw, kind)` returns the hardware with those numbers in
place of the preset's and its sources saying so; `hardware_for_device_kind` applies it, so every plan and
simulation on a calibrated device kind rests on measured constants, and a device kind without a preset (the CPU)
gets a cost model at all once calibrated.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

from epsjax.files import read_json
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.hardware_spec import Hardware

CALIBRATION_DIR = pathlib.Path(__file__).parent / "calibrations"
FIELDS = ("device_kind", "dense_tflops", "memory_gbs", "attention_efficiency", "link_gbs", "link_latency_s",
          "dispatch_latency_s", "devices", "cores", "memory_gb")


def file_name(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") + ".json"


def calibration_path(kind: str, directory: pathlib.Path | str | None = None) -> pathlib.Path:
    return pathlib.Path(directory if directory is not None else CALIBRATION_DIR) / file_name(kind)


NUMBERS = ("memory_gbs", "attention_efficiency", "link_gbs", "link_latency_s", "dispatch_latency_s", "devices",
           "cores", "memory_gb")
OPTIONAL_NUMBERS = ("host_to_device_gbs", "overlap_interference")  # null or absent in older calibrations


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def load_calibration(kind: str, directory: pathlib.Path | str | None = None) -> dict | None:
    """The calibration of a device kind, or None. A file that cannot be read, is not a JSON object, misses a field
    or holds a field of the wrong type is a ScheduleError naming the file (and the field)."""
    path = calibration_path(kind, directory)
    if not path.exists() and not path.is_symlink():
        return None
    redo = "re-run scripts/gpu_check.py, or remove the file to use the preset's constants"
    data = read_json(path, "the calibration", ScheduleError, redo)
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: a calibration must be a JSON object, got {type(data).__name__}; {redo}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ScheduleError(f"{path}: calibration lacks {missing}; re-run scripts/gpu_check.py")
    bad = [f"{f}={data[f]!r}" for f in NUMBERS if not _number(data[f])]
    bad += [f"{f}={data[f]!r}" for f in OPTIONAL_NUMBERS if data.get(f) is not None and not _number(data[f])]
    tflops = data["dense_tflops"]
    if not isinstance(tflops, dict) or not tflops or not all(isinstance(k, str) and _number(v)
                                                             for k, v in tflops.items()):
        bad.append(f"dense_tflops={tflops!r}")
    if not isinstance(data["device_kind"], str):
        bad.append(f"device_kind={data['device_kind']!r}")
    if bad:
        raise ScheduleError(f"{path}: calibration fields of the wrong type: {', '.join(bad)} (numbers are finite and "
                            f">= 0, dense_tflops an object of dtype -> TFLOP/s, device_kind a string); {redo}")
    data["path"] = str(path)
    return data


def calibration_matching(hw: Hardware, directory: pathlib.Path | str | None = None) -> str | None:
    """The device kind of a calibration file that a preset's pattern matches (e.g. "NVIDIA H800" for h800), so a
    preset named directly (simulate_eps --hardware h800, FinDEP's testbeds) reads it too; None if there is none."""
    folder = pathlib.Path(directory if directory is not None else CALIBRATION_DIR)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # a damaged file is named when its device kind loads it (load_calibration)
        kind = data.get("device_kind", "") if isinstance(data, dict) else ""
        if isinstance(kind, str) and kind and re.search(hw.device_kind_pattern, kind, flags=re.IGNORECASE):
            return kind
    return None


def _cpu_base(cal: dict) -> Hardware:
    """The CPU as the cost models see it: every rate below comes from the calibration (`calibrated`)."""
    return Hardware(
        name="cpu", device_kind_pattern=r"^cpu$", sms=int(cal["cores"]), tflops=(("float32", 1.0),),
        hbm_gb=float(cal["memory_gb"]), hbm_gbs=1.0, nvlink_gbs=0, pcie_gbs=1.0, network_gbs=1.0,
        gpus_per_node=max(int(cal["devices"]), 1), grouped_backend="chunked", grouped_block_m=8,
        fallback_backend=None, dense_gemm_efficiency=1.0, grouped_gemm_efficiency=1.0,
        comm_saturation_sms=1, async_collectives=False,
        sources=(("async_collectives", "XLA:CPU runs collectives synchronously (no start/done pairs in the HLO: "
                                       "bench_prefill.py --hlo), so they take the compute stream"),))


def calibrated(hw: Hardware | None, kind: str, directory: pathlib.Path | str | None = None) -> Hardware | None:
    """`hw` (a preset, or None for a device kind without one) with the measured constants of `kind`'s
    calibration in place of the assumed ones; unchanged when there is no calibration."""
    cal = load_calibration(kind, directory)
    if cal is None:
        return hw
    base = hw if hw is not None else _cpu_base(cal)
    tflops = dict(base.tflops)
    tflops.update({dtype: float(rate) for dtype, rate in cal["dense_tflops"].items()})
    where = f"calibrated: {pathlib.Path(cal['path']).name} ({cal.get('created', '?')}, {cal.get('host', '?')})"
    sources = dict(base.sources)
    sources.update({
        "compute": f"{where}: dense matmul {', '.join(f'{k} {v:.4g}' for k, v in cal['dense_tflops'].items())} "
                   "TFLOP/s measured, used as the peak at efficiency 1",
        "memory": f"{where}: {cal['memory_gbs']:.4g} GB/s measured streaming copy",
        "attention_efficiency": f"{where}: {cal['attention_efficiency']:.3g} of the measured matmul rate",
        "links": f"{where}: all-to-all {cal['link_gbs']:.4g} GB/s per device, {cal['link_latency_s'] * 1e6:.3g} us "
                 f"fixed cost, over {cal['devices']} devices",
        "latencies": f"{where}: {cal['dispatch_latency_s'] * 1e6:.3g} us per dispatched program",
    })
    host_gbs = cal.get("host_to_device_gbs")  # optional: calibrations written before it was measured lack it
    if host_gbs:
        sources["host_copies"] = f"{where}: host -> device copy {float(host_gbs):.4g} GB/s measured"
    interference = cal.get("overlap_interference")  # gpu_check.py, with more than one GPU
    if interference is not None:
        sources["overlap"] = f"{where}: a GEMM beside a collective ran {float(interference):.3g} slower (measured)"
    # The measured matmul rate becomes the peak, so the grouped kernels' assumed efficiencies are taken relative to
    # the dense one they were assumed beside (GEMM profile tables, fitted by CostModel.build, replace both).
    relative = 1.0 / base.dense_gemm_efficiency
    hw = base.replace(
        tflops=tuple(sorted(tflops.items())), hbm_gbs=float(cal["memory_gbs"]), hbm_efficiency=1.0,
        dense_gemm_efficiency=1.0, grouped_gemm_efficiency=min(1.0, base.grouped_gemm_efficiency * relative),
        fallback_efficiency=min(1.0, base.fallback_efficiency * relative),
        attention_efficiency=float(cal["attention_efficiency"]),
        kernel_latency_s=float(cal["dispatch_latency_s"]), sources=tuple(sorted(sources.items())),
        overlap_interference=base.overlap_interference if interference is None else float(interference),
        host_to_device_gbs=float(host_gbs) if host_gbs else base.host_to_device_gbs)
    link_gbs = float(cal["link_gbs"])
    if link_gbs <= 0:  # one device: nothing measured between devices, the preset's links stay
        sources["links"] = f"{base.name} preset (calibrated on one device: no links measured)"
        return hw.replace(sources=tuple(sorted(sources.items())))
    return hw.replace(nvlink_gbs=2 * link_gbs if base.nvlink_gbs else 0.0,
                      pcie_gbs=base.pcie_gbs if base.nvlink_gbs else 2 * link_gbs, link_efficiency=1.0,
                      nvlink_latency_s=float(cal["link_latency_s"]), pcie_latency_s=float(cal["link_latency_s"]))


def describe(cal: dict) -> str:
    return (f"dense {', '.join(f'{k} {v:.3g}' for k, v in cal['dense_tflops'].items())} TFLOP/s, memory "
            f"{cal['memory_gbs']:.3g} GB/s, attention {cal['attention_efficiency']:.2f} of matmul, all-to-all "
            f"{cal['link_gbs']:.3g} GB/s + {cal['link_latency_s'] * 1e6:.0f} us, dispatch "
            f"{cal['dispatch_latency_s'] * 1e6:.0f} us")


__all__ = ["CALIBRATION_DIR", "FIELDS", "calibrated", "calibration_path", "describe", "load_calibration"]
