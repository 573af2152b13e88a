"""The Hardware record: what the cost models read of one accelerator and the node it sits in (rates, memory, links,
efficiencies, latencies), with each value's source.

Presets fill it from datasheets (hardware.py); a calibration file replaces assumed values by measured ones
(calibration.py). Both build on this module, and hardware.py's lookups apply calibrations, so the record lives
below them.
"""

from __future__ import annotations

import dataclasses

from epsjax.scheduler.errors import ScheduleError

GB = 1e9
TFLOP = 1e12
US = 1e-6


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator model and the node it usually sits in.

    tflops: dense peak per dtype name ("bfloat16", "float16", "float8_e4m3fn", "float32"); a dtype missing here
        is not supported by the tensor cores (float32 falls back to the CUDA-core rate).
    nvlink_gbs / pcie_gbs: datasheet figures, both directions added (0 = no NVLink between GPUs of a node).
    network_gbs: per GPU, per direction, between nodes (a deployment choice, not a GPU property).
    gpus_per_node: GPUs joined by NVLink (or by PCIe when nvlink_gbs is 0).
    """

    name: str
    device_kind_pattern: str          # regex on jax's device_kind
    sms: int
    tflops: tuple[tuple[str, float], ...]
    hbm_gb: float
    hbm_gbs: float
    nvlink_gbs: float
    pcie_gbs: float
    network_gbs: float
    gpus_per_node: int = 8
    # Efficiencies and latencies: assumptions shared by every preset unless a preset overrides them.
    dense_gemm_efficiency: float = 0.75    # DenseGemm (XLA / cuBLAS batched matmul) at large M: fraction of peak
    grouped_gemm_efficiency: float = 0.70  # GroupGemm kernels at large M: fraction of peak
    attention_efficiency: float = 0.35     # FlashAttention-2 prefill: fraction of peak
    hbm_efficiency: float = 0.85           # streaming reads/writes: fraction of the HBM datasheet rate
    link_efficiency: float = 0.80          # large collectives: fraction of the per-direction link rate
    comm_saturation_sms: int = 20          # SMs a communication kernel needs to saturate NVLink / the NIC
    kernel_latency_s: float = 4 * US       # launch + ramp + tail of one kernel
    nvlink_latency_s: float = 15 * US      # fixed cost of one collective over NVLink (NCCL, small messages)
    pcie_latency_s: float = 30 * US        # ... over PCIe
    network_latency_s: float = 25 * US     # ... over the network (RDMA)
    grouped_block_m: int = 128             # rows per tile of the default GroupGemm tiling (padding per group)
    grouped_backend: str = "mosaic_gpu"    # pallas_kernels backend that implements GroupGemm here
    fallback_backend: str | None = "pallas_triton"  # the GroupGemm for shapes the main one does not take
    fallback_efficiency: float = 0.60      # ... its fraction of peak at large M (block_m 64)
    async_collectives: bool = True         # collectives run beside compute (GPU); False: on the compute stream
    async_comm_sms: int = 16               # SMs an unreserved collective's kernels take from the GEMMs while it runs
    overlap_interference: float | None = None  # measured slowdown of a GEMM beside a collective (calibration)
    host_to_device_gbs: float | None = None    # measured host -> device copy rate (calibration); None: PCIe preset
    sources: tuple[tuple[str, str], ...] = ()

    def peak_flops(self, dtype: str) -> float:
        table = dict(self.tflops)
        name = {"bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn", "fp32": "float32"}.get(dtype, dtype)
        if name.startswith("float8") and name not in table:
            name = "bfloat16"  # no FP8 tensor cores: the runtime would upcast
        if name not in table:
            raise ScheduleError(f"{self.name}: no peak rate for dtype {dtype!r}; known: {sorted(table)}")
        return table[name] * TFLOP

    @property
    def nvlink_per_direction(self) -> float:
        return self.nvlink_gbs * GB / 2

    @property
    def pcie_per_direction(self) -> float:
        return self.pcie_gbs * GB / 2

    @property
    def intra_node_per_direction(self) -> float:
        """Bytes/s one GPU can send (and receive) to the other GPUs of its node: NVLink, else PCIe."""
        return self.nvlink_per_direction if self.nvlink_gbs else self.pcie_per_direction

    @property
    def intra_node_latency(self) -> float:
        return self.nvlink_latency_s if self.nvlink_gbs else self.pcie_latency_s

    @property
    def network_per_direction(self) -> float:
        return self.network_gbs * GB

    def replace(self, **changes) -> "Hardware":
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        return {"name": self.name, "sms": self.sms, "tflops_dense": dict(self.tflops), "hbm_gb": self.hbm_gb,
                "hbm_gbs": self.hbm_gbs, "nvlink_gbs_bidirectional": self.nvlink_gbs,
                "pcie_gbs_bidirectional": self.pcie_gbs, "network_gbs_per_direction": self.network_gbs,
                "gpus_per_node": self.gpus_per_node, "sources": dict(self.sources)}
