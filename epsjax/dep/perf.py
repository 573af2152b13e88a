"""FinDEP's performance and memory models of one DEP deployment, from epsjax.scheduler's cost models.

Every task of a DEP step (epsjax/dep/schedule.py) gets a duration from the scheduler's alpha-beta cost models of
its operations, as a function of x = the tokens one attention device contributes to it (a micro-batch's ma * S
tokens, or a segment's ma * S / r2):

    attention   MLA / GQA prefill attention + router + sort of the T*K rows     (attention device)
    shared      the shared experts' gated MLP                                     (attention device)
    combine     un-sort the returned rows, weight by the router, residual          (attention device)
    a2e / e2a   the routed rows, attention devices <-> expert devices             (all-to-all link model below)
    experts     grouped expert FFN of the busiest expert device                   (expert device)
    dense, embed, head: DeepSeek-V2's dense first layer, the embedding, last-position logits (attention device)

Routing. Uniform by default (every expert gets 1 / E of the routed rows: the busiest expert device is the one
with the most experts). `TaskCosts.routing` takes a histogram instead (per-expert shares, e.g. a
RoutingHistogram's or DEPOutput.tokens_per_expert summed, or `zipf_shares`): expert device e then receives its
experts' share of every attention device's rows, and the expert group's step is set by its most loaded device
(an expert FFN time is computed per device and the maximum taken; the links carry the uneven bytes).

`LinearModels` fits t = alpha + beta * x (non-negative least squares on relative error) to each of them over the
range of sizes the solver explores: FinDEP's formulation. `TaskCosts.seconds` is the cost model itself, which the
simulator uses to score a chosen plan; the fit error is reported next to it.

Links. A transfer of bytes[p, q] between devices takes  max over used link classes of its latency  +  max over
devices p and classes c of max(bytes p sends over c, bytes p receives over c) / rate(c). Classes: the intra-node
fabric (NVLink switch, or PCIe without NVLink), the network between nodes, and an NVLink bridge joining two GPUs
(RTX A6000 pairs (0,1), (2,3), ...: a separate link beside PCIe). Without bridges this is exactly
CostModel.all_to_all.

Memory. Per attention device: weights other than the routed experts (replicated: attention is data parallel),
the KV cache of every sequence of the step, the hidden state and the T*K routed rows (out and back) of every
micro-batch in flight, and the attention workspace of one micro-batch. Per expert device: the routed experts it
owns (the busiest device: ceil(E / eg) experts), the received and returned rows of every micro-batch in flight
and the FFN hidden state of one segment (the most loaded device's share of the rows). Both are
fixed + x * (r1 * a + b + c / r2) bytes: linear in ma.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from epsjax.dep.groups import expert_bounds
from epsjax.scheduler import layer_costs as lc
from epsjax.scheduler.costs import CostModel
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.hardware import Hardware, get_hardware
from epsjax.scheduler.schedules import expert_ffn_time
from epsjax.models.config import ModelConfig

GB = 1e9
MICRO_KINDS = ("embed", "dense", "attention", "shared", "combine", "a2e", "head")
SEGMENT_KINDS = ("experts", "e2a")
USABLE_MEMORY = 0.9  # assumption: 10% of device memory goes to the framework, CUDA context and fragmentation


# Testbeds and deployments ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Testbed:
    """GPUs of one kind, gpus_per_node to a node. nvlink_bridges: consecutive pairs (0,1), (2,3), ... are joined
    by an NVLink bridge of bridge_gbs (both directions added) beside the node's PCIe fabric (RTX A6000)."""

    __test__ = False  # not a pytest test class, whatever its name

    name: str
    hardware: str
    gpus: int
    gpus_per_node: int = 8
    nvlink_bridges: bool = False
    bridge_gbs: float = 112.5
    note: str = ""

    @property
    def hw(self) -> Hardware:
        return get_hardware(self.hardware).replace(gpus_per_node=self.gpus_per_node)

    def node(self, device: int) -> int:
        return device // self.gpus_per_node

    def bridged(self, p: int, q: int) -> bool:
        return self.nvlink_bridges and p // 2 == q // 2 and p != q


TESTBEDS = {
    # FinDEP's testbeds (arXiv:2512.21487). RTX A6000s are bridged in pairs (0,1), (2,3), (4,5), (6,7) by NVLink
    # bridges (112.5 GB/s, both directions; the bridge joins exactly two cards); everything else crosses PCIe 4.0
    # x16. Deployment.split places attention GPUs one per pair so each has a bridge to an expert GPU.
    "8xA6000": Testbed("8xA6000", "a6000", 8, nvlink_bridges=True,
                       note="NVLink bridges join GPU pairs (0,1),(2,3),(4,5),(6,7); other traffic over PCIe 4.0"),
    "8xA10": Testbed("8xA10", "a10", 8, note="PCIe 4.0 only"),
    "8xH20": Testbed("8xH20", "h20", 8, note="NVLink (900 GB/s, NVSwitch)"),
    "32xH20": Testbed("32xH20", "h20", 32, note="4 nodes x 8, NVLink inside, one 400 Gb/s NIC per GPU between"),
}


def zipf_shares(num_experts: int, s: float, seed: int = 0) -> tuple[float, ...]:
    """A skewed routing histogram: expert shares proportional to 1 / rank^s (s = 0: uniform), the ranks shuffled
    over the experts with a fixed seed (so hot experts land on devices as they happen to, not all on the first)."""
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** s
    weights = weights[np.random.default_rng(seed).permutation(num_experts)]
    return tuple(float(w) for w in weights / weights.sum())


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Which testbed devices form the attention group and the expert group."""

    testbed: Testbed
    attention_devices: tuple[int, ...]
    expert_devices: tuple[int, ...]

    def __post_init__(self):
        both = self.attention_devices + self.expert_devices
        if not self.attention_devices or not self.expert_devices:
            raise ScheduleError("both groups need at least one device")
        if len(set(both)) != len(both) or min(both) < 0 or max(both) >= self.testbed.gpus:
            raise ScheduleError(f"groups {self.attention_devices} / {self.expert_devices} must be distinct devices of "
                                f"{self.testbed.name} (0..{self.testbed.gpus - 1})")

    @property
    def ag(self) -> int:
        return len(self.attention_devices)

    @property
    def eg(self) -> int:
        return len(self.expert_devices)

    @classmethod
    def split(cls, testbed: Testbed, ag: int, eg: int) -> "Deployment":
        """ag attention devices and eg expert devices. With NVLink bridges, one attention device per bridged pair
        (0, 2, 4, ...) so each has a bridge to an expert device; otherwise the first ag devices (a whole node
        for ag = 8)."""
        if ag + eg > testbed.gpus:
            raise ScheduleError(f"{ag} + {eg} devices exceed {testbed.name}'s {testbed.gpus}")
        if testbed.nvlink_bridges:
            attention = tuple(range(0, 2 * ag, 2)) if 2 * ag <= testbed.gpus else tuple(range(ag))
        else:
            attention = tuple(range(ag))
        rest = tuple(d for d in range(ag + eg) if d not in attention)
        if len(rest) < eg:
            rest = tuple(d for d in range(testbed.gpus) if d not in attention)
        return cls(testbed, attention, rest[:eg])

    def describe(self) -> str:
        return f"{self.testbed.name}: attention {list(self.attention_devices)}, experts {list(self.expert_devices)}"


def transfer_time(send: np.ndarray, testbed: Testbed, costs: CostModel) -> float:
    """Seconds to move send[p, q] bytes from testbed device p to device q, all at once (module docstring)."""
    send = np.asarray(send, dtype=np.float64)
    P = send.shape[0]
    off = send * (1 - np.eye(P))
    if not off.any():
        return 0.0
    hw, eff = testbed.hw, testbed.hw.link_efficiency
    ids = np.arange(P)
    node = ids // testbed.gpus_per_node
    bridge = np.array([[testbed.bridged(p, q) for q in range(P)] for p in range(P)])
    same = (node[:, None] == node[None, :]) & ~bridge
    classes = ((same, hw.intra_node_per_direction, hw.intra_node_latency),
               (~same & ~bridge, hw.network_per_direction, hw.network_latency_s),
               (bridge, testbed.bridge_gbs * GB / 2, hw.nvlink_latency_s))
    t, latency = 0.0, 0.0
    for mask, rate, lat in classes:
        part = off * mask
        if part.any():
            t = max(t, float(np.maximum(part.sum(1), part.sum(0)).max()) / (rate * eff))
            latency = max(latency, lat)
    return latency + t


# Task durations from the cost models -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskCosts:
    """Durations of the DEP tasks of one model on one deployment for prompts of seq_len new tokens after
    `context` cached ones (prefill: context 0). backend: the expert GEMM backend ("auto": the cheapest).
    routing: per-expert shares of the routed rows ([E], any scale; None: uniform), module docstring."""

    cfg: ModelConfig
    deployment: Deployment
    seq_len: int
    context: int = 0
    dtype: str | None = None
    backend: str = "auto"
    routing: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.routing is not None:
            shares = np.asarray(self.routing, np.float64)
            if shares.shape != (self.cfg.num_experts,) or (shares < 0).any() or shares.sum() <= 0:
                raise ScheduleError(f"routing must be {self.cfg.num_experts} non-negative shares, not all zero")

    @functools.cached_property
    def costs(self) -> CostModel:
        return CostModel.build(self.deployment.testbed.hw, self.dtype or self.cfg.dtype)

    @property
    def itemsize(self) -> int:
        return self.costs.itemsize

    @functools.cached_property
    def experts_per_device(self) -> tuple[int, ...]:
        b = expert_bounds(self.cfg.num_experts, self.deployment.eg)
        return tuple(b1 - b0 for b0, b1 in zip(b[:-1], b[1:]))

    @functools.cached_property
    def shares(self) -> np.ndarray:
        """[E] each expert's share of the routed rows (sums to 1)."""
        if self.routing is None:
            return np.full(self.cfg.num_experts, 1.0 / self.cfg.num_experts)
        shares = np.asarray(self.routing, np.float64)
        return shares / shares.sum()

    @functools.cached_property
    def device_shares(self) -> np.ndarray:
        """[eg] each expert device's share of the routed rows (uniform routing: n_e / E)."""
        b = expert_bounds(self.cfg.num_experts, self.deployment.eg)
        return np.array([self.shares[b0:b1].sum() for b0, b1 in zip(b[:-1], b[1:])])

    @property
    def imbalance(self) -> float:
        """The most loaded expert device's rows over the mean (1.0: balanced)."""
        return float(self.device_shares.max() * self.deployment.eg)

    def row_bytes(self, tokens: float) -> np.ndarray:
        """[testbed devices]^2 bytes of the routed rows of `tokens` tokens per attention device: expert device e
        receives its experts' share of every attention device's T*K rows (uniform routing: n_e / E)."""
        cfg, dep = self.cfg, self.deployment
        send = np.zeros((dep.testbed.gpus, dep.testbed.gpus))
        rows = tokens * cfg.router.top_k * self.device_shares * cfg.d_model * self.itemsize
        for a in dep.attention_devices:
            send[a, list(dep.expert_devices)] = rows
        return send

    def seconds(self, kind: str, tokens: float) -> float:
        """One task's duration for `tokens` tokens per attention device (a segment's tokens for experts / e2a)."""
        if tokens <= 0:
            return 0.0
        return self._seconds(kind, float(tokens))

    @functools.lru_cache(maxsize=1 << 14)
    def _seconds(self, kind: str, tokens: float) -> float:
        cfg, costs, dep = self.cfg, self.costs, self.deployment
        D, T = cfg.d_model, int(math.ceil(tokens))
        if kind == "embed":
            return costs.memory_pass(2.0 * tokens * D * self.itemsize)
        if kind == "attention":
            return (self._attention(T) + lc.router_time(costs, cfg, T) + lc.permute_time(costs, cfg, tokens))
        if kind == "dense":
            return self._attention(T) + lc.dense_ffn_time(costs, T, D, cfg.dense_ffn_dim)
        if kind == "shared":
            return lc.dense_ffn_time(costs, T, D, lc.side_ffn_width(cfg))
        if kind == "combine":
            return lc.unpermute_time(costs, cfg, tokens)
        if kind == "head":
            return lc.lm_head_time(costs, cfg, max(1, int(round(tokens / self.seq_len))))
        if kind in ("a2e", "e2a"):
            send = self.row_bytes(tokens)
            return transfer_time(send if kind == "a2e" else send.T, dep.testbed, costs)
        if kind == "experts":  # the most loaded expert device sets the group's pace
            total = dep.ag * tokens * cfg.router.top_k
            b = expert_bounds(cfg.num_experts, dep.eg)
            loads = {tuple(total * self.shares[b0:b1]) for b0, b1 in zip(b[:-1], b[1:])}  # distinct devices only
            return max(expert_ffn_time(costs, self.backend, np.array(mu), total, D, cfg.expert_ffn_dim)
                       for mu in loads)
        raise ScheduleError(f"unknown task kind {kind!r}")

    def _attention(self, tokens: int) -> float:
        """The scheduler's attention (projections + core FLOPs over seq_len new and `context` cached tokens) plus
        reading the cached K/V once per sequence: what decode (seq_len 1) is bound by."""
        t = lc.attention_time(self.costs, self.cfg, tokens, self.seq_len, self.context)
        if self.context:
            sequences = tokens / self.seq_len
            t += self.costs.memory_pass(sequences * self.context * self.kv_bytes_per_token)
        return t

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one token in one layer: MLA's latent + rotary key, or GQA's keys and values."""
        cfg = self.cfg
        if cfg.mla is None:
            return 2 * cfg.num_kv_heads * cfg.head_dim * self.itemsize
        return (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * self.itemsize

    # Memory ------------------------------------------------------------------------------------------------------

    def memory(self) -> "MemoryModel":
        cfg, dep = self.cfg, self.deployment
        isz, D, K = self.itemsize, cfg.d_model, cfg.router.top_k
        weight_isz = getattr(self.costs, "weight_itemsize", isz)
        counts = cfg.param_counts()
        layers, moe_layers = cfg.num_layers, len(cfg.moe_layers)
        if cfg.mla is None:
            work = cfg.num_heads * 3 * cfg.head_dim
        else:
            m = cfg.mla
            work = cfg.num_heads * (m.qk_head_dim + m.qk_nope_head_dim + m.v_head_dim)
        kv_per_token = layers * self.kv_bytes_per_token * (self.seq_len + self.context) / self.seq_len
        share = float(self.device_shares.max())
        limit = dep.testbed.hw.hbm_gb * GB * USABLE_MEMORY
        return MemoryModel(
            ag_fixed=(counts["total"] - counts["routed_experts"]) * weight_isz,
            ag_step=kv_per_token + 2 * D * isz + 2 * K * D * isz,
            ag_micro=work * isz,
            eg_fixed=max(self.experts_per_device) * 3 * D * cfg.expert_ffn_dim * moe_layers * weight_isz,
            eg_step=dep.ag * K * share * 2 * D * isz,
            eg_segment=dep.ag * K * share * 2 * cfg.expert_ffn_dim * isz,
            ag_limit=limit, eg_limit=limit)


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Bytes per attention device: ag_fixed + x * (r1 * ag_step + ag_micro); per expert device:
    eg_fixed + x * (r1 * eg_step + eg_segment / r2), x = ma * S tokens of one micro-batch per attention device."""

    ag_fixed: float
    ag_step: float
    ag_micro: float
    eg_fixed: float
    eg_step: float
    eg_segment: float
    ag_limit: float
    eg_limit: float

    def bytes(self, tokens: float, r1: int, r2: int) -> tuple[float, float]:
        return (self.ag_fixed + tokens * (r1 * self.ag_step + self.ag_micro),
                self.eg_fixed + tokens * (r1 * self.eg_step + self.eg_segment / r2))

    def fits(self, tokens: float, r1: int, r2: int) -> bool:
        ag, eg = self.bytes(tokens, r1, r2)
        return ag <= self.ag_limit and eg <= self.eg_limit

    def max_tokens(self, r1: int, r2: int) -> float:
        """The largest micro-batch (tokens per attention device) that fits, or 0 when the weights alone do not."""
        def room(free, per_token):
            return (float("inf") if free >= 0 else 0.0) if per_token <= 0 else free / per_token

        ag = room(self.ag_limit - self.ag_fixed, r1 * self.ag_step + self.ag_micro)
        eg = room(self.eg_limit - self.eg_fixed, r1 * self.eg_step + self.eg_segment / r2)
        return max(0.0, min(ag, eg))


# Linear models ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Linear:
    alpha: float
    beta: float
    max_rel_err: float = 0.0

    def __call__(self, x: float) -> float:
        return self.alpha + self.beta * x if x > 0 else 0.0


def fit_linear(xs, ts) -> Linear:
    """alpha, beta >= 0 minimising the relative error of alpha + beta * x over the samples."""
    xs, ts = np.asarray(xs, np.float64), np.asarray(ts, np.float64)
    keep = ts > 0
    xs, ts = xs[keep], ts[keep]
    if xs.size == 0:
        return Linear(0.0, 0.0)
    a = np.stack([np.ones_like(xs), xs], axis=1) / ts[:, None]
    b = np.ones_like(ts)
    best, best_res = (0.0, 0.0), np.inf
    for cols in ((0, 1), (0,), (1,)):  # non-negative least squares over two columns: best feasible subset fit
        sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.all(sol >= 0):
            full = np.zeros(2)
            full[list(cols)] = sol
            res = float(np.sum((a @ full - b) ** 2))
            if res < best_res:
                best, best_res = (float(full[0]), float(full[1])), res
    pred = best[0] + best[1] * xs
    return Linear(best[0], best[1], float(np.max(np.abs(pred - ts) / ts)))


@dataclasses.dataclass(frozen=True)
class LinearModels:
    """alpha + beta * x per task kind (x: tokens per attention device of the micro-batch or segment)."""

    models: tuple[tuple[str, Linear], ...]

    def __getitem__(self, kind: str) -> Linear:
        return dict(self.models)[kind]

    def seconds(self, kind: str, tokens: float) -> float:
        return dict(self.models)[kind](tokens)

    @classmethod
    def fit(cls, task_costs: TaskCosts, lo: float, hi: float, points: int = 24) -> "LinearModels":
        """Fits every kind over token sizes lo..hi (geometric; integers as the cost models take them)."""
        xs = np.unique(np.round(np.geomspace(max(lo, 1.0), max(hi, lo, 1.0), points)))
        return cls(tuple((kind, fit_linear(xs, [task_costs.seconds(kind, x) for x in xs]))
                         for kind in MICRO_KINDS + SEGMENT_KINDS))

    def as_dict(self) -> dict:
        return {k: dataclasses.asdict(m) for k, m in self.models}
