"""Alpha-beta cost models: GEMM backends, attention, collectives, host-to-device copies.

Every model is a latency plus sizes over rates, so one formula serves the planner and the simulator:

    GEMM (one launch)   t = alpha + beta * flops(padded rows) * S / S_gemm + gamma * weights * max(1, S / (2 S_gemm))
    expert FFN          gate/up GEMM [rows, D] x [D, 2F]  +  down GEMM [rows, F] x [F, D]
    attention prefill   t = projections (dense GEMMs) + alpha + core flops / (peak * eff_attn * S_gemm / S)
    memory-bound pass   t = alpha + bytes / (HBM * eff_hbm)
    all-to-all          t = alpha_link + max over devices of max(bytes out, bytes in) / (link * eff_link * u(S_comm))
    all-reduce (ring)   t = alpha_link + 2 (n - 1) / n * bytes / (link * eff_link * u(S_comm))
    all-gather, reduce-scatter: (n - 1) / n * bytes;  send/recv: bytes;  host->device: PCIe per direction

S = SMs of the device, S_gemm = SMs left to compute, S_comm = SMs given to communication (`sm_for_comm`), and
u(S_comm) = min(1, S_comm / comm_saturation_sms), or 1 when no SMs are reserved (sm_for_comm = 0: NCCL-style
asynchronous collectives with their own thread blocks). Compute rate scales with the SMs a kernel owns; HBM
bandwidth is assumed to saturate with half of them. A GEMM with a collective beside it slows (`overlap_extra`)
over the overlapped part of its run: the SMs an unreserved collective takes (async_comm_sms), and HBM
contention (the collective's bytes through HBM against the GEMM's memory-bound part), or a calibrated factor.
Sources and assumptions: hardware.py.

GEMM parameters: `beta = 1 / (peak * efficiency)`, `gamma = bytes per element / (HBM * eff_hbm)` (the roofline
smoothed into a sum: achieved rate = peak * eff * m / (m + m_half) with m_half = gamma / (2 beta) rows per expert)
from the hardware preset, or fitted by non-negative least squares on the measured profile table of the device kind
(pallas_kernels/profiles/*.json, written by scripts/profile_gemm.py). `CostModel.sources` says which, per part.

Padding: GroupGemm computes whole row tiles of `block_m` rows per work item (ceil(M / block_m) + active groups - 1
items, pallas_kernels.work_list); DenseGemm computes every slot at the capacity bucket that holds the fullest one
(pallas_kernels.dense_gemm.DenseTiling.buckets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Literal

import numpy as np

from epsjax.files import read_json
from epsjax.pallas_kernels.selector import PROFILE_DIR  # the kernels' measured GEMM tables
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.hardware import Hardware, get_hardware


# GEMM ---------------------------------------------------------------------------------------------------------------

def grouped_rows(rows: np.ndarray, block_m: int) -> int:
    """Rows a GroupGemm computes: whole tiles per work item (tiles straddling two groups count twice)."""
    total = int(np.sum(rows))
    if total == 0:
        return 0
    active = int(np.count_nonzero(rows))
    return (math.ceil(total / block_m) + active - 1) * block_m


def dense_capacity(rows: np.ndarray, capacities: tuple[int, ...] | None = None,
                   buffer_rows: int | None = None) -> int:
    """Rows per slot a DenseGemm computes: the smallest capacity bucket that holds the fullest slot.

    Buckets follow pallas_kernels.dense_gemm.DenseTiling.buckets for an lhs of M = buffer_rows rows (the static
    buffer the kernel is given; default: exactly the routed rows): explicit `capacities` clipped to M, else
    cdiv(M, S) x (1, 2, 4) rounded up to a multiple of 8. Past the last bucket the kernel falls back to a grouped
    GEMM; that case is modelled as a bucket at the fullest slot rounded up to 8.
    """
    slots, fullest = len(rows), int(np.max(rows, initial=0))
    if int(np.sum(rows)) == 0:
        return 0
    total = int(np.sum(rows)) if buffer_rows is None else max(int(buffer_rows), int(np.sum(rows)))
    if capacities is None:
        base = -(-total // max(slots, 1))
        buckets = sorted({min(total, -(-base * f // 8) * 8) for f in (1, 2, 4)})
    else:
        buckets = sorted({min(c, total) for c in capacities})
    for c in buckets:
        if c >= fullest:
            return c
    return -(-fullest // 8) * 8


@dataclasses.dataclass(frozen=True)
class GemmModel:
    """One GEMM backend: t = alpha + beta * flops * S / S_gemm + gamma * weight elements * max(1, S / 2 S_gemm).

    kind "grouped": rows padded to tiles of block_m per work item, weights of active groups read.
    kind "dense": every slot computed at its capacity bucket, every slot's weights read.
    """

    backend: str
    kind: Literal["grouped", "dense"]
    alpha: float
    beta: float
    gamma: float
    block_m: int = 128
    source: str = "preset"

    def padded_rows(self, rows: np.ndarray, capacities: tuple[int, ...] | None = None,
                    buffer_rows: int | None = None) -> int:
        if self.kind == "grouped":
            return grouped_rows(rows, self.block_m)
        return dense_capacity(rows, capacities, buffer_rows) * len(rows)

    def weight_groups(self, rows: np.ndarray) -> int:
        return int(np.count_nonzero(rows)) if self.kind == "grouped" else len(rows)

    def terms(self, rows, k: int, n: int, capacities: tuple[int, ...] | None = None,
              buffer_rows: int | None = None) -> tuple[float, float, float]:
        """(launches, flops, weight elements) of one [sum(rows), k] x [G, k, n] grouped product whose lhs buffer
        has buffer_rows rows (default: exactly sum(rows))."""
        rows = np.asarray(rows)
        return (1.0, 2.0 * self.padded_rows(rows, capacities, buffer_rows) * k * n,
                float(self.weight_groups(rows)) * k * n)

    def time_of(self, terms: tuple[float, float, float], sm_fraction: float = 1.0) -> float:
        launches, flops, weights = terms
        return (launches * self.alpha + self.beta * flops / sm_fraction
                + self.gamma * weights * max(1.0, 0.5 / sm_fraction))

    def time(self, rows, k: int, n: int, *, sm_fraction: float = 1.0,
             capacities: tuple[int, ...] | None = None) -> float:
        """Seconds of one [sum(rows), k] x [G, k, n] grouped product (rows[g] rows for group g)."""
        return self.time_of(self.terms(rows, k, n, capacities), sm_fraction)

    def ffn_terms(self, rows, d: int, f: int, capacities: tuple[int, ...] | None = None,
                  buffer_rows: int | None = None):
        """Terms of the expert FFN: fused gate/up GEMM [., D] x [D, 2F] then down [., F] x [F, D]."""
        a, b = self.terms(rows, d, 2 * f, capacities, buffer_rows), self.terms(rows, f, d, capacities, buffer_rows)
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    def ffn_time(self, rows, d: int, f: int, *, sm_fraction: float = 1.0,
                 capacities: tuple[int, ...] | None = None) -> float:
        """The expert FFN on these rows (see ffn_terms)."""
        return self.time_of(self.ffn_terms(rows, d, f, capacities), sm_fraction)

    def efficiency(self, tokens_per_expert: float, k: int, n: int, peak: float, groups: int = 1) -> float:
        """Useful flops / (time * peak) at a balanced load: the efficiency curve vs tokens per expert."""
        rows = np.full(groups, int(tokens_per_expert))
        return 2.0 * rows.sum() * k * n / (self.time(rows, k, n) * peak) if rows.sum() else 0.0


def preset_gemm_models(hw: Hardware, dtype: str) -> dict[str, GemmModel]:
    """GroupGemm (and its fallback kernel) and DenseGemm from the hardware preset (roofline, assumed
    efficiencies)."""
    itemsize = _itemsize(dtype)
    peak = hw.peak_flops(dtype)
    gamma = itemsize / (hw.hbm_gbs * 1e9 * hw.hbm_efficiency)
    what = (f"preset roofline: {hw.name} {dtype} peak {peak / 1e12:.4g} TFLOP/s x {{eff}} (assumed), "
            f"HBM {hw.hbm_gbs:.4g} GB/s x {hw.hbm_efficiency} (assumed), alpha {hw.kernel_latency_s * 1e6:.3g} us")
    models = {
        hw.grouped_backend: GemmModel(hw.grouped_backend, "grouped", hw.kernel_latency_s,
                                      1 / (peak * hw.grouped_gemm_efficiency), gamma, hw.grouped_block_m,
                                      what.format(eff=hw.grouped_gemm_efficiency)),
        "dense": GemmModel("dense", "dense", hw.kernel_latency_s, 1 / (peak * hw.dense_gemm_efficiency), gamma,
                           source=what.format(eff=hw.dense_gemm_efficiency)),
    }
    if hw.fallback_backend:
        models[hw.fallback_backend] = GemmModel(hw.fallback_backend, "grouped", hw.kernel_latency_s,
                                                1 / (peak * hw.fallback_efficiency), gamma, 64,
                                                what.format(eff=hw.fallback_efficiency))
    return models


# Fitting from profile tables ---------------------------------------------------------------------------------------

GROUPED_BACKENDS = {"mosaic_gpu": 128, "pallas_triton": 64, "jax_triton": 64, "ragged_dot": 128, "chunked": 64}


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: the best of the unconstrained fits on each column subset."""
    best, best_res = np.zeros(a.shape[1]), float(np.sum(b ** 2))
    cols = a.shape[1]
    for mask in range(1, 1 << cols):
        idx = [c for c in range(cols) if mask >> c & 1]
        x, *_ = np.linalg.lstsq(a[:, idx], b, rcond=None)
        if np.all(x >= 0):
            full = np.zeros(cols)
            full[idx] = x
            res = float(np.sum((a @ full - b) ** 2))
            if res < best_res:
                best, best_res = full, res
    return best


def _entry_rows(entry: dict) -> np.ndarray | None:
    """Rows per group of a profile entry: exact for balanced loads; None for skewed ones (shares not recorded)."""
    if entry.get("group_sizes") is not None:
        return np.asarray(entry["group_sizes"])
    if entry.get("load", "balanced") == "balanced":
        return np.full(int(entry["E"]), int(entry["tokens_per_expert"]))
    return None


def _capacities(entry: dict) -> tuple[int, ...] | None:
    tiling = entry.get("tiling") or {}
    caps = tiling.get("capacities")
    return tuple(caps) if caps else None


def fit_gemm_model(entries: list[dict], backend: str, source: str) -> tuple[GemmModel, dict] | None:
    """(alpha, beta, gamma) of one backend by non-negative least squares on relative error, over the profile
    entries with known group sizes (balanced loads). "expert_ffn" entries count two launches and three matrices.
    Returns the model and fit statistics, or None without usable entries."""
    kind = "dense" if backend == "dense" else "grouped"
    shell = GemmModel(backend, kind, 0.0, 0.0, 0.0, GROUPED_BACKENDS.get(backend, 128))
    rows_a, rows_b, used = [], [], []
    for e in entries:
        rows = _entry_rows(e)
        if e["backend"] != backend or not e.get("seconds") or rows is None:
            continue
        k, n = int(e["K"]), int(e["N"])
        padded = shell.padded_rows(rows, _capacities(e))
        if e["op"] == "expert_ffn":  # gate/up [D, 2F] and down [F, D]: 3 matrices of K x N, 2 launches
            launches, flops, weights = 2, 6.0 * padded * k * n, 3.0 * shell.weight_groups(rows) * k * n
        elif e["op"] == "group_gemm":
            launches, flops, weights = 1, 2.0 * padded * k * n, float(shell.weight_groups(rows)) * k * n
        else:
            continue
        t = float(e["seconds"])
        rows_a.append(np.array([launches, flops, weights]) / t)
        rows_b.append(1.0)
        used.append((np.array([launches, flops, weights]), t))
    if len(used) < 3:
        return None
    alpha, beta, gamma = _nnls(np.array(rows_a), np.array(rows_b))
    model = GemmModel(backend, kind, alpha, beta, gamma, shell.block_m, source)
    rel = [abs(x @ np.array([alpha, beta, gamma]) - t) / t for x, t in used]
    stats = {"points": len(used), "median_rel_err": float(np.median(rel)), "max_rel_err": float(np.max(rel))}
    return dataclasses.replace(model, source=f"{source} ({len(used)} points, median |rel err| "
                                             f"{100 * stats['median_rel_err']:.1f}%)"), stats


def find_profile(hw: Hardware, profile_dir: pathlib.Path | str | None = None) -> pathlib.Path | None:
    """The measured profile table of this hardware's device kind in profile_dir (a CPU table only for the CPU)."""
    import re

    directory = pathlib.Path(profile_dir) if profile_dir is not None else PROFILE_DIR
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.json")):
        try:
            table = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(table, dict):
            continue
        if (table.get("is_cpu") or table.get("platform") == "cpu") != (hw.name == "cpu"):
            continue  # CPU tables for the (calibrated) CPU only
        if re.search(hw.device_kind_pattern, str(table.get("device_kind", "")), flags=re.IGNORECASE):
            return path
    return None


def fitted_gemm_models(path: pathlib.Path, dtype: str) -> tuple[dict[str, GemmModel], dict]:
    """Every backend of a profile table that has enough entries of this dtype (any dtype if none match)."""
    path = pathlib.Path(path)
    table = read_json(path, "the GEMM profile table", ScheduleError)
    try:
        entries = table.get("entries", [])
        entries = [e for e in entries if e.get("dtype") == dtype] or entries
        models, stats = {}, {}
        for backend in sorted({e["backend"] for e in entries}):
            fit = fit_gemm_model(entries, backend, f"fitted from {path.name}")
            if fit is not None:
                models[backend], stats[backend] = fit
    except ScheduleError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # an entry without a field, or of another type
        raise ScheduleError(f"{path}: a GEMM profile entry is malformed ({type(e).__name__}: {e}); re-run "
                            "scripts/profile_gemm.py or remove the file") from None
    return models, stats


# The bundle ---------------------------------------------------------------------------------------------------------

def _itemsize(dtype: str) -> int:
    if "8" in dtype and "float8" in dtype:
        return 1
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Cost models of one hardware for one compute dtype.

    gemm: backend name -> GemmModel (presets, replaced per backend by fits of a measured table).
    sources: part -> where its numbers come from ("preset ..." or "fitted from ..."). Shown in every output.
    """

    hw: Hardware
    dtype: str
    gemm: tuple[tuple[str, GemmModel], ...]
    sources: tuple[tuple[str, str], ...]
    activation_dtype: str | None = None

    @classmethod
    def build(cls, hardware: "str | Hardware", dtype: str = "bfloat16", *,
              profile_dir: pathlib.Path | str | None = None, use_profiles: bool = True,
              activation_dtype: str | None = None) -> "CostModel":
        """Cost models for GEMMs (operands and weights) in `dtype`; hidden states, attention and communication in
        activation_dtype (default: dtype). E.g. dtype="float8_e4m3fn", activation_dtype="bfloat16" for W8A8 GEMMs
        in a bf16 model."""
        hw = get_hardware(hardware)
        models = preset_gemm_models(hw, dtype)
        path = find_profile(hw, profile_dir) if use_profiles else None
        if path is not None:
            fitted, _ = fitted_gemm_models(path, dtype)
            models.update(fitted)
        sources = {f"gemm:{name}": m.source for name, m in sorted(models.items())}
        sources["attention"] = (f"preset: {hw.name} peak x {hw.attention_efficiency} (FlashAttention-2-level "
                                f"efficiency, hardware.py) + projections through the dense GEMM model")
        sources["links"] = (f"preset: {hw.name} intra-node {hw.intra_node_per_direction / 1e9:.4g} GB/s per "
                            f"direction ({'NVLink' if hw.nvlink_gbs else 'PCIe'}) x {hw.link_efficiency}, network "
                            f"{hw.network_gbs:.4g} GB/s, saturating at {hw.comm_saturation_sms} SMs")
        sources["memory"] = f"preset: HBM {hw.hbm_gbs:.4g} GB/s x {hw.hbm_efficiency}"
        sources["overlap"] = (f"preset: a collective beside a GEMM takes {hw.async_comm_sms} SMs when none are "
                              f"reserved, and its bytes compete for HBM (CostModel.overlap_extra)"
                              if hw.async_collectives else "no overlap: collectives run on the compute stream")
        measured = {k: v for k, v in hw.sources if str(v).startswith("calibrated")}  # epsjax/scheduler/calibration
        sources["host_copies"] = (f"preset: PCIe {hw.pcie_per_direction / 1e9:.4g} GB/s per direction x "
                                  f"{hw.link_efficiency}")
        for part, key in (("attention", "attention_efficiency"), ("links", "links"), ("memory", "memory"),
                          ("overlap", "overlap"), ("host_copies", "host_copies"),
                          ("compute", "compute"), ("latencies", "latencies")):
            if key in measured:
                sources[part] = measured[key]
        if activation_dtype not in (None, dtype):
            sources["dtypes"] = f"GEMMs in {dtype}; activations, attention and communication in {activation_dtype}"
        return cls(hw, dtype, tuple(sorted(models.items())), tuple(sources.items()), activation_dtype)

    # Parts --------------------------------------------------------------------------------------------------------

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.gemm)

    def gemm_model(self, backend: str) -> GemmModel:
        models = dict(self.gemm)
        if backend not in models:
            raise ScheduleError(f"no cost model for backend {backend!r} on {self.hw.name}; have {sorted(models)}")
        return models[backend]

    @property
    def act_dtype(self) -> str:
        return self.activation_dtype or self.dtype

    @property
    def itemsize(self) -> int:
        """Bytes per element of activations (hidden states, all-to-all rows)."""
        return _itemsize(self.act_dtype)

    @property
    def weight_itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def peak(self) -> float:
        """Dense peak of the GEMM dtype."""
        return self.hw.peak_flops(self.dtype)

    def sm_fraction(self, sm_for_comm: int) -> float:
        return (self.hw.sms - sm_for_comm) / self.hw.sms

    def overlap_extra(self, compute_s, memory_s, *, overlapped_s: float, overlapped_bytes: float,
                      sm_for_comm: int):
        """Seconds a kernel (``compute_s`` compute-bound + ``memory_s`` memory-bound) loses to collectives
        running beside it for ``overlapped_s`` while moving ``overlapped_bytes`` through this device's HBM. With
        SMs reserved the SM split is already in `sm_fraction`; with none reserved (asynchronous collectives)
        the collective's kernels take ``async_comm_sms`` SMs over the overlapped part of the run. The bytes
        compete with the memory-bound part for HBM (at most its own length). A measured
        ``overlap_interference`` (calibration: a GEMM beside an unreserved collective) replaces both when no SMs
        are reserved: that fraction over the overlapped part."""
        hw = self.hw
        total = np.maximum(compute_s + memory_s, 1e-12)
        part = np.minimum(1.0, overlapped_s / total)  # fraction of the run a collective shares
        if hw.overlap_interference is not None and sm_for_comm == 0:
            return part * total * hw.overlap_interference
        sms = 0.0 if sm_for_comm > 0 else hw.async_comm_sms / max(hw.sms - hw.async_comm_sms, 1)
        return part * compute_s * sms + np.minimum(memory_s, overlapped_bytes / (hw.hbm_gbs * 1e9 * hw.hbm_efficiency))

    def comm_scale(self, sm_for_comm: int) -> float:
        """Fraction of the link rate a communication kernel reaches with sm_for_comm SMs (0 = not reserved)."""
        return 1.0 if sm_for_comm <= 0 else min(1.0, sm_for_comm / self.hw.comm_saturation_sms)

    def dense_gemm(self, rows: int, k: int, n: int, *, sm_for_comm: int = 0) -> float:
        """One plain [rows, k] x [k, n] matmul (projections, shared experts, dense FFNs)."""
        if rows <= 0:
            return 0.0
        return self.gemm_model("dense").time(np.array([rows]), k, n, sm_fraction=self.sm_fraction(sm_for_comm),
                                             capacities=(rows,))

    def memory_pass(self, nbytes: float, *, sm_for_comm: int = 0) -> float:
        """A memory-bound kernel moving nbytes (reads + writes)."""
        frac = self.sm_fraction(sm_for_comm)
        return self.hw.kernel_latency_s + nbytes / (self.hw.hbm_gbs * 1e9 * self.hw.hbm_efficiency) * max(
            1.0, 0.5 / frac)

    def attention_core(self, flops: float, *, sm_for_comm: int = 0) -> float:
        """The softmax(QK^T)V part of prefill attention (a FlashAttention kernel)."""
        rate = self.hw.peak_flops(self.act_dtype) * self.hw.attention_efficiency * self.sm_fraction(sm_for_comm)
        return self.hw.kernel_latency_s + flops / rate

    # Communication ------------------------------------------------------------------------------------------------

    def _link(self, participants: int) -> tuple[float, float]:
        """(bytes/s per direction, latency) of the slowest link a collective over `participants` GPUs uses."""
        hw = self.hw
        if participants > hw.gpus_per_node:
            return min(hw.network_per_direction, hw.intra_node_per_direction), hw.network_latency_s
        return hw.intra_node_per_direction, hw.intra_node_latency

    def all_to_all(self, send_bytes: np.ndarray, *, sm_for_comm: int = 0) -> float:
        """send_bytes[p, q]: bytes device p sends device q (the diagonal stays local). Devices p // gpus_per_node
        share a node; intra-node bytes go over NVLink (or PCIe), the rest over the network, both at once."""
        send = np.asarray(send_bytes, dtype=np.float64)
        P = send.shape[0]
        if P <= 1 or not send.any():
            return 0.0
        hw = self.hw
        node = np.arange(P) // hw.gpus_per_node
        same = node[:, None] == node[None, :]
        off = send * (1 - np.eye(P))
        scale = hw.link_efficiency * self.comm_scale(sm_for_comm)
        intra = np.maximum((off * same).sum(1), (off * same).sum(0)) / (hw.intra_node_per_direction * scale)
        t = float(intra.max())
        latency = hw.intra_node_latency
        if P > hw.gpus_per_node:
            inter = np.maximum((off * ~same).sum(1), (off * ~same).sum(0)) / (hw.network_per_direction * scale)
            t = max(t, float(inter.max()))
            latency = max(latency, hw.network_latency_s)
        return latency + t

    def all_reduce(self, nbytes: float, participants: int, *, sm_for_comm: int = 0) -> float:
        """Ring all-reduce of an nbytes buffer held by each participant."""
        return self._ring(2 * nbytes, participants, sm_for_comm)

    def all_gather(self, nbytes_total: float, participants: int, *, sm_for_comm: int = 0) -> float:
        """All-gather (or reduce-scatter) of a buffer of nbytes_total once gathered."""
        return self._ring(nbytes_total, participants, sm_for_comm)

    reduce_scatter = all_gather

    def _ring(self, nbytes: float, n: int, sm_for_comm: int) -> float:
        if n <= 1 or nbytes <= 0:
            return 0.0
        bw, latency = self._link(n)
        return latency + (n - 1) / n * nbytes / (bw * self.hw.link_efficiency * self.comm_scale(sm_for_comm))

    def send_recv(self, nbytes: float, *, same_node: bool = True, sm_for_comm: int = 0) -> float:
        """One point-to-point transfer (FinDEP's attention <-> expert groups)."""
        if nbytes <= 0:
            return 0.0
        bw, latency = self._link(1 if same_node else self.hw.gpus_per_node + 1)
        return latency + nbytes / (bw * self.hw.link_efficiency * self.comm_scale(sm_for_comm))

    def host_to_device(self, nbytes: float) -> float:
        """A pinned host -> device copy over PCIe (ExpertFlow's expert loads)."""
        if nbytes <= 0:
            return 0.0
        if self.hw.host_to_device_gbs:  # measured (calibration)
            return self.hw.kernel_latency_s + nbytes / (self.hw.host_to_device_gbs * 1e9)
        return self.hw.kernel_latency_s + nbytes / (self.hw.pcie_per_direction * self.hw.link_efficiency)

    def describe(self) -> dict:
        return {"hardware": self.hw.name, "dtype": self.dtype, "activation_dtype": self.act_dtype,
                "sources": dict(self.sources),
                "gemm": {name: dataclasses.asdict(m) for name, m in self.gemm}}
