"""Hardware presets: the public numbers of each accelerator the scheduler plans for, with their sources.

Every figure is per GPU. Rates are *dense* (the datasheets print the 2:4-sparsity figure first; we halve it).
Link bandwidths are stored as the datasheet prints them (NVLink and PCIe: both directions added up) and the cost
models use `*_per_direction`, half of it. What a value's source does not say is marked as an assumption.

    hw = get_hardware("h800")                     # by name
    hw = hardware_for_device_kind("NVIDIA H100 80GB HBM3")   # from jax.devices()[0].device_kind

Measured GEMM profiles (pallas_kernels/profiles/*.json) replace the GEMM part of these presets where they exist
(epsjax/scheduler/costs.py); the rest (attention, links) always comes from here.
"""

from __future__ import annotations

import re

from epsjax.scheduler.calibration import calibrated, calibration_matching
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.hardware_spec import Hardware


# Shared source notes ------------------------------------------------------------------------------------------------

_ASSUMED = {
    "dense_gemm_efficiency": "assumption (not measured here): public cuBLAS BF16 benchmarks of large GEMMs on "
                             "Hopper/Ampere reach roughly 70-80% of the dense datasheet peak; replaced by "
                             "pallas_kernels/profiles/*.json where measured",
    "grouped_gemm_efficiency": "assumption: grouped GEMMs pay tile scheduling and per-group padding; 5 points below "
                               "DenseGemm (EPS-MoE sec. 3 reports GroupGemm below DenseGemm at large loads)",
    "attention_efficiency": "FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608), abstract: "
                            "FlashAttention-2 reaches ~35% utilization on H100; Ampere presets use 0.5 "
                            "(FlashAttention-2 paper, arXiv:2307.08691: 50-73% of peak on A100, lower end)",
    "fallback_efficiency": "assumption: the Pallas Triton GroupGemm (64-row tiles) on Hopper, used where Mosaic GPU "
                           "does not take the shape (K % 64 or N % 128), 10 points below Mosaic GPU",
    "hbm_efficiency": "assumption: streaming kernels reach ~85-90% of the HBM datasheet rate",
    "link_efficiency": "DeepSeek-V3 technical report (arXiv:2412.19437) sec. 3.2.2: H800 NVLink achieves "
                       "160 GB/s of its 200 GB/s per direction (0.8); applied to every link as an assumption",
    "async_comm_sms": "assumption: NCCL runs a collective with one thread block per channel, 16-32 channels over "
                      "NVLink by default; an asynchronous collective (XLA:GPU's start/done pairs, no SMs reserved) "
                      "takes 16 SMs from the GEMMs beside it while it runs. Replaced by a measured "
                      "overlap_interference in the device's calibration when present",
    "comm_saturation_sms": "DeepSeek-V3 technical report sec. 3.2.2: 20 SMs suffice to saturate IB and NVLink "
                           "(H800); all-to-all bandwidth is modelled as rising linearly to that point",
    "latencies": "assumption: ~4 us per kernel launch, 15 us (NVLink) / 30 us (PCIe) / 25 us (RDMA) fixed cost per "
                 "NCCL collective at small sizes; order of magnitude only",
    "network_gbs": "deployment assumption: one 400 Gb/s NDR NIC per GPU as in the DGX H100 reference design "
                   "(8x ConnectX-7); not a GPU property",
}

_HOPPER_SMS = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): H100 SXM5 has 132 SMs"


def _assumed_but(*overridden: str) -> list[tuple[str, str]]:
    """The shared assumptions' sources, less those a preset states itself."""
    return [(k, v) for k, v in _ASSUMED.items() if k not in overridden]


def _presets() -> dict[str, Hardware]:
    p = {}
    p["h100"] = Hardware(
        name="h100", device_kind_pattern=r"H100", sms=132,
        # H100 SXM datasheet (nvidia.com/en-us/data-center/h100): BF16/FP16 1,979 TFLOPS and FP8 3,958 TFLOPS
        # "with sparsity" -> 989.4 / 1,979 dense; FP32 67 TFLOPS; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s;
        # PCIe Gen5 128 GB/s. The PCIe card (114 SMs, 756 TFLOPS) is a different product, not modelled.
        tflops=(("bfloat16", 989.4), ("float16", 989.4), ("float8_e4m3fn", 1979.0), ("float32", 67.0)),
        hbm_gb=80, hbm_gbs=3350, nvlink_gbs=900, pcie_gbs=128, network_gbs=50,
        sources=(("compute/memory/links", "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column"),
                 ("sms", _HOPPER_SMS), *_ASSUMED.items()))
    p["h800"] = p["h100"].replace(
        name="h800", device_kind_pattern=r"H800",
        # H800 SXM5 datasheet (NVIDIA, China market): same tensor-core rates and 80 GB HBM3 at 3.35 TB/s as the
        # H100 SXM, NVLink cut to 400 GB/s (vs 900), PCIe Gen5 128 GB/s. The Ant Group H20 write-up quoted in
        # the EPS-MoE context lists the same: 989 TFLOPS BF16, 3,352 GB/s. SM count: assumed equal to H100
        # SXM (the datasheet does not print it).
        nvlink_gbs=400,
        sources=(("compute/memory/links", "NVIDIA H800 Tensor Core GPU datasheet, SXM5 column: NVLink 400 GB/s"),
                 ("sms", "assumption: 132 as H100 SXM5 (same GH100 configuration; not on the datasheet)"),
                 *_ASSUMED.items()))
    p["h200"] = p["h100"].replace(
        name="h200", device_kind_pattern=r"H200",
        # H200 SXM datasheet: BF16 1,979 / FP8 3,958 TFLOPS with sparsity (same as H100 SXM), 141 GB HBM3e at
        # 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
        hbm_gb=141, hbm_gbs=4800,
        sources=(("compute/memory/links", "NVIDIA H200 Tensor Core GPU datasheet, SXM column"),
                 ("sms", "assumption: 132 as H100 SXM5 (same GH100 compute configuration)"), *_ASSUMED.items()))
    p["h20"] = p["h100"].replace(
        name="h20", device_kind_pattern=r"H20\b", sms=78,
        # NVIDIA publishes no open H20 datasheet; OEM spec sheets and press (e.g. the Ant Group H20 deployment
        # write-up: 148 TFLOPS BF16, 296 TFLOPS FP8, 96 GB at 4,000 GB/s, NVLink 900 GB/s) agree on these.
        # SMs: 78 as reported by third parties (uncertain). FP32 44 TFLOPS (press figure, uncertain).
        tflops=(("bfloat16", 148.0), ("float16", 148.0), ("float8_e4m3fn", 296.0), ("float32", 44.0)),
        hbm_gb=96, hbm_gbs=4000, nvlink_gbs=900, pcie_gbs=128,
        sources=(("compute/memory/links", "no public NVIDIA datasheet: OEM spec sheets / press figures "
                                          "(148 TFLOPS BF16 dense, 4.0 TB/s, NVLink 900 GB/s)"),
                 ("sms", "uncertain: 78 SMs as reported by third parties"), *_ASSUMED.items()))
    p["a100"] = p["h100"].replace(
        name="a100", device_kind_pattern=r"A100", sms=108,
        # A100 datasheet, 80GB SXM column: BF16 312 TFLOPS dense (624 sparse), FP32 19.5 TFLOPS, no FP8;
        # HBM2e 2,039 GB/s; NVLink 600 GB/s; PCIe Gen4 64 GB/s. 108 SMs (NVIDIA A100 whitepaper).
        tflops=(("bfloat16", 312.0), ("float16", 312.0), ("float32", 19.5)),
        hbm_gb=80, hbm_gbs=2039, nvlink_gbs=600, pcie_gbs=64, network_gbs=25,
        attention_efficiency=0.5, grouped_backend="pallas_triton", grouped_block_m=64, fallback_backend=None,
        sources=(("compute/memory/links", "NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column"),
                 ("sms", "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 108 SMs"),
                 ("network_gbs", "deployment assumption: one 200 Gb/s HDR NIC per GPU (DGX A100 design)"),
                 *_assumed_but("network_gbs")))
    p["a6000"] = p["a100"].replace(
        name="a6000", device_kind_pattern=r"A6000", sms=84,
        # RTX A6000 datasheet: FP32 38.7 TFLOPS, tensor 309.7 TFLOPS (with sparsity) -> ~154.8 dense FP16/BF16;
        # 48 GB GDDR6 at 768 GB/s; PCIe Gen4 x16 (64 GB/s both directions). Its NVLink bridge joins only two
        # cards (112.5 GB/s), so a multi-GPU node is modelled as PCIe-only. 84 SMs (GA102 full configuration).
        tflops=(("bfloat16", 154.8), ("float16", 154.8), ("float32", 38.7)),
        hbm_gb=48, hbm_gbs=768, nvlink_gbs=0, pcie_gbs=64, network_gbs=12.5,
        sources=(("compute/memory/links", "NVIDIA RTX A6000 datasheet (tensor TFLOPS halved: sparsity figure)"),
                 ("sms", "NVIDIA Ampere GA102 whitepaper: 84 SMs on RTX A6000"),
                 ("network_gbs", "deployment assumption: 100 GbE per GPU"),
                 *_assumed_but("network_gbs")))
    p["a40"] = p["a6000"].replace(
        name="a40", device_kind_pattern=r"A40\b", sms=84,
        # A40 datasheet: BF16 149.7 TFLOPS dense (299.4 sparse), FP32 37.4 TFLOPS, 48 GB GDDR6 (ECC) at 696 GB/s,
        # PCIe Gen4 x16 64 GB/s; its NVLink bridge joins two cards only (112.5 GB/s): modelled as PCIe-only.
        # 84 SMs (GA102 full configuration). ExpertFlow-style single-GPU offloading testbeds use such cards.
        tflops=(("bfloat16", 149.7), ("float16", 149.7), ("float32", 37.4)), hbm_gb=48, hbm_gbs=696,
        sources=(("compute/memory/links", "NVIDIA A40 datasheet (tensor TFLOPS: the dense figure)"),
                 ("sms", "NVIDIA Ampere GA102 whitepaper: 84 SMs (full GA102, as RTX A6000)"),
                 ("network_gbs", "deployment assumption: 100 GbE per GPU"),
                 *_assumed_but("network_gbs")))
    p["a10"] = p["a6000"].replace(
        name="a10", device_kind_pattern=r"A10\b", sms=72,
        # A10 datasheet: BF16 125 TFLOPS dense (250 sparse), FP32 31.2 TFLOPS, 24 GB GDDR6 at 600 GB/s,
        # PCIe Gen4 64 GB/s, no NVLink. 72 SMs (GA102 as configured for A10).
        tflops=(("bfloat16", 125.0), ("float16", 125.0), ("float32", 31.2)),
        hbm_gb=24, hbm_gbs=600, nvlink_gbs=0, pcie_gbs=64, network_gbs=12.5,
        sources=(("compute/memory/links", "NVIDIA A10 Tensor Core GPU datasheet"),
                 ("sms", "NVIDIA A10 product brief: 72 SMs (uncertain: not on the short datasheet)"),
                 ("network_gbs", "deployment assumption: 100 GbE per GPU"),
                 *_assumed_but("network_gbs")))
    return p


PRESETS: dict[str, Hardware] = _presets()


def list_hardware() -> list[str]:
    return sorted(PRESETS)


def get_hardware(name: "str | Hardware", calibration_dir=None) -> Hardware:
    """A preset by name (case-insensitive; with the measured constants of a calibration file its pattern matches,
    epsjax/scheduler/calibration.py), a device kind, or the Hardware itself."""
    if isinstance(name, Hardware):
        return name
    key = str(name).lower()
    if key not in PRESETS:
        found = hardware_for_device_kind(name, calibration_dir)
        if found is None:
            raise ScheduleError(f"unknown hardware {name!r}; presets: {', '.join(list_hardware())}")
        return found
    kind = calibration_matching(PRESETS[key], calibration_dir)
    return PRESETS[key] if kind is None else calibrated(PRESETS[key], kind, calibration_dir)


def hardware_for_device_kind(kind: str, calibration_dir=None) -> Hardware | None:
    """The preset whose pattern matches a jax device_kind (e.g. "NVIDIA H100 80GB HBM3") with the measured
    constants of the kind's calibration file in place (epsjax/scheduler/calibration.py) where one exists; a kind
    without a preset (the CPU) has a cost model only once calibrated; None otherwise."""
    # H200 before H20 and A100 before A10 are kept apart by the word boundaries in the patterns.
    preset = next((hw for hw in PRESETS.values() if re.search(hw.device_kind_pattern, kind, flags=re.IGNORECASE)),
                  None)
    return calibrated(preset, kind, calibration_dir)
