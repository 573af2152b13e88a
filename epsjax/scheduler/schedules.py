"""The task graph of one transformer layer under a parallel layout and a plan, for the simulator.

Layouts (one model replica over `devices` GPUs):

    TP+TP   attention TP over all devices, each expert's FFN split over them (Megatron / vLLM);
            all-reduce after attention and after the MoE.
    TP+EP   attention TP (rules "tp_ep"), MoE expert-parallel over all devices: reduce-scatter after attention
            splits the tokens, all-gather after the MoE replicates them again (with a side FFN - Arctic's dense
            residual - the attention output is all-reduced and the side FFN's partial sums reduce-scattered).
    DP+EP   attention data-parallel (rules "dp_ep", DeepSeek-V2 in EPS-MoE), MoE expert-parallel.

The EP MoE on every device (streams "gpuN/compute" and "gpuN/comm"):

    compute: router, permute, side FFN, GEMM_0, GEMM_1, ..., GEMM_{PN-1}, unpermute
    comm:    dispatch_0, dispatch_1, combine_0, dispatch_2, combine_1, ..., combine_{PN-1}

dispatch_s / combine_s are all-to-alls over every device (one task on all comm streams); GEMM_s waits for
dispatch_s, combine_s for GEMM_s of every device. Stages overlap in two ways the search chooses between: with
sm_for_comm > 0 SMs reserved for communication (GEMMs get the rest), or, with none reserved, as asynchronous
collectives beside the GEMMs (XLA:GPU's start/done pairs on NCCL; `Hardware.async_collectives`), the GEMMs
slowed by `CostModel.overlap_slowdown` over the part of their run a collective shares. Where collectives cannot
run asynchronously (XLA:CPU) or PN = 1, they take the compute streams, one stage after the other (dispatch_s,
GEMM_s, combine_s): with PN = 1 that is the unpipelined TP/DP + EP layer.

Loads: expert e receives mu_e = tokens * K * share_e assignments per step (shares from a measured routing
histogram, or uniform). Every device routes its tokens with the same shares. The all-to-alls move one row per
(token, destination device) in each stage, as sharding/ep_moe.py does (`destination_hits`): a token's experts on
one device travel as one row, with their ids and weights beside it. The rows of one GEMM carry multinomial noise
around mu: the expert of rank i (by mu) among n gets mu + z_i * sqrt(mu (1 - share)), z_i the expected i-th order
statistic of n standard normals (Blom) - what makes DenseGemm pad to the fullest expert even at a uniform routing
distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Literal

import numpy as np
from epsjax.models.config import ModelConfig

from epsjax.scheduler import layer_costs as lc
from epsjax.scheduler.costs import CostModel
from epsjax.scheduler.errors import ScheduleError
from epsjax.scheduler.plan import Plan
from epsjax.scheduler.simulator import Schedule


@dataclasses.dataclass(frozen=True)
class Layout:
    """devices: GPUs of one replica. attention_tp: attention tensor-parallel degree (1 = data parallel).
    moe: "ep" (experts over all devices) or "tp" (every expert's FFN split over the attention TP group)."""

    devices: int
    attention_tp: int = 1
    moe: Literal["tp", "ep"] = "ep"

    def __post_init__(self):
        if self.devices < 1 or self.attention_tp < 1 or self.devices % self.attention_tp:
            raise ScheduleError(f"attention_tp={self.attention_tp} must divide devices={self.devices}")
        if self.moe not in ("tp", "ep"):
            raise ScheduleError(f"moe must be 'tp' or 'ep', got {self.moe!r}")

    @property
    def attention_dp(self) -> int:
        return self.devices // self.attention_tp

    @property
    def name(self) -> str:
        att = f"TP{self.attention_tp}" if self.attention_tp > 1 else f"DP{self.devices}"
        if 1 < self.attention_tp < self.devices:
            att += f"xDP{self.attention_dp}"
        moe = f"EP{self.devices}" if self.moe == "ep" else f"TP{self.attention_tp}"
        return f"{att}+{moe}"

    @classmethod
    def tp_tp(cls, devices: int) -> "Layout":
        return cls(devices, devices, "tp")

    @classmethod
    def tp_ep(cls, devices: int) -> "Layout":
        return cls(devices, devices, "ep")

    @classmethod
    def dp_ep(cls, devices: int) -> "Layout":
        return cls(devices, 1, "ep")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One prefill step of one replica: `tokens` new tokens (sequences of seq_len after `context` cached ones).
    expert_load: share of the routed assignments per expert (length E, normalised here); None = uniform."""

    cfg: ModelConfig
    layout: Layout
    tokens: int
    seq_len: int
    context: int = 0
    expert_load: tuple[float, ...] | None = None

    def __post_init__(self):
        cfg, lay = self.cfg, self.layout
        if self.tokens < lay.devices or self.seq_len < 1:
            raise ScheduleError(f"need tokens >= devices ({lay.devices}) and seq_len >= 1; got tokens={self.tokens} "
                                f"seq_len={self.seq_len}")
        if lay.moe == "ep" and cfg.num_experts % lay.devices:
            raise ScheduleError(f"{cfg.name}: {cfg.num_experts} experts do not divide over {lay.devices} devices")
        if cfg.num_heads % lay.attention_tp:
            raise ScheduleError(f"{cfg.name}: {cfg.num_heads} heads do not divide over TP={lay.attention_tp}")
        if self.expert_load is not None:
            load = np.asarray(self.expert_load, dtype=np.float64)
            if load.shape != (cfg.num_experts,) or np.any(load < 0) or not load.sum() > 0:
                raise ScheduleError(f"expert_load must be {cfg.num_experts} non-negative numbers with a positive sum")
            object.__setattr__(self, "expert_load", tuple(float(x) for x in load / load.sum()))

    def shares(self) -> np.ndarray:
        E = self.cfg.num_experts
        return np.full(E, 1.0 / E) if self.expert_load is None else np.asarray(self.expert_load)

    @property
    def assignments(self) -> float:
        return float(self.tokens) * self.cfg.router.top_k

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=None)
def _blom(n: int) -> tuple[float, ...]:
    """Expected order statistics of n standard normals (Blom's approximation), ascending."""
    dist = statistics.NormalDist()
    return tuple(dist.inv_cdf((i + 1 - 0.375) / (n + 0.25)) for i in range(n))


def noisy_rows(mu: np.ndarray, total: float) -> np.ndarray:
    """Rows of one GEMM's experts with multinomial noise at expected order statistics (module docstring)."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.size <= 1 or total <= 0:
        return np.round(mu)
    sigma = np.sqrt(np.maximum(mu * (1.0 - mu / total), 0.0))
    z = np.empty_like(mu)
    z[np.argsort(mu, kind="stable")] = _blom(mu.size)
    return np.round(np.maximum(mu + z * sigma, 0.0))


def expert_ffn_time(costs: CostModel, backend: str, mu: np.ndarray, total: float, d: int, f: int, *,
                    sm_for_comm: int = 0, tiling: dict | None = None, buffer_rows: int | None = None) -> float:
    """The routed-expert FFN of one device for one stage (expected rows mu per expert); "auto" = the cheapest."""
    return float(stage_gemm_times(costs, backend, np.asarray(mu)[None], total, d, f, sm_for_comm=sm_for_comm,
                                  tiling=tiling, buffer_rows=buffer_rows)[0])


def stage_gemm_times(costs: CostModel, backend: str, mu: np.ndarray, total: float, d: int, f: int, *,
                     sm_for_comm: int = 0, tiling: dict | None = None, buffer_rows: int | None = None,
                     overlapped_s: float = 0.0, overlapped_bytes: float = 0.0) -> np.ndarray:
    """[devices] routed-expert FFN times of one stage; mu: [devices, experts of the stage] expected rows.
    buffer_rows: rows of the static receive buffer the kernel gets (EP: the worst case; sets DenseGemm's default
    capacity buckets). overlapped_s, overlapped_bytes: seconds of collectives running beside the stage (the
    pipeline's next dispatch and previous combine) and the bytes they move through a device's HBM, which slow
    the GEMMs (`CostModel.overlap_extra`)."""
    if backend == "auto":
        return np.min([stage_gemm_times(costs, b, mu, total, d, f, sm_for_comm=sm_for_comm, buffer_rows=buffer_rows,
                                        overlapped_s=overlapped_s, overlapped_bytes=overlapped_bytes)
                       for b in usable_backends(costs, d, f)], axis=0)
    model = costs.gemm_model(backend)
    caps = tuple((tiling or {}).get("capacities") or ()) or None
    mu = np.ascontiguousarray(mu, dtype=np.float64)
    launches, flops, weights = _ffn_terms(model, mu.tobytes(), mu.shape, float(total), d, f, caps, buffer_rows)
    frac = costs.sm_fraction(sm_for_comm)
    compute, memory = model.beta * flops / frac, model.gamma * weights * max(1.0, 0.5 / frac)
    seconds = launches * model.alpha + compute + memory
    if overlapped_s > 0:
        seconds = seconds + costs.overlap_extra(compute, memory, overlapped_s=overlapped_s,
                                                overlapped_bytes=overlapped_bytes, sm_for_comm=sm_for_comm)
    return seconds


@functools.lru_cache(maxsize=None)
def usable_backends(costs: CostModel, d: int, f: int) -> tuple[str, ...]:
    """The modelled backends that can run the expert FFN's GEMMs ([., D] x [D, F] and [., F] x [F, D]) in the
    cost model's dtype: the Pallas GroupGemms take 16-bit operands (Mosaic GPU also e4m3: its FP8 kernels; the
    selector sends others to XLA), and Mosaic GPU needs both expert FFN kernels' tiles to divide D and F
    (pallas_kernels.group_gemm_mgpu.supports)."""
    try:
        import jax.numpy as jnp
        from epsjax.pallas_kernels import group_gemm_mgpu
    except ImportError:  # kernels unavailable: trust the cost model's list
        return costs.backends
    out = []
    dtype = jnp.dtype(costs.dtype)
    for name in costs.backends:
        if name in ("pallas_triton", "jax_triton") and dtype.itemsize != 2:
            continue
        if name == "mosaic_gpu" and not group_gemm_mgpu.supports(dtype, d, f, op="expert_ffn"):
            continue
        out.append(name)
    return tuple(out) or costs.backends


@functools.lru_cache(maxsize=1 << 16)
def _ffn_terms(model, mu_bytes: bytes, shape: tuple[int, int], total: float, d: int, f: int, caps, buffer_rows):
    mu = np.frombuffer(mu_bytes, dtype=np.float64).reshape(shape)
    terms = np.array([model.ffn_terms(noisy_rows(row, total), d, f, caps, buffer_rows) for row in mu])
    return terms[:, 0], terms[:, 1], terms[:, 2]


def _symmetric(w: Workload, plan: Plan, dense: bool) -> bool:
    """Whether every device of the layer does the same work (then one device stands for all)."""
    if dense or w.layout.moe == "tp" or w.expert_load is None:
        return True
    return all(np.allclose(mu, mu[:1]) for mu in stage_loads(w, plan))


def ep_buffer_rows(w: Workload, plan: Plan, stage_experts: int) -> int:
    """Rows of a stage's static expert-FFN buffer in sharding/ep_moe.py: every peer's chunk of tokens (one row per
    token, transports.rows_per_peer), each row running at most min(K, stage experts) experts."""
    P = w.layout.devices
    return P * math.ceil(w.tokens / P / plan.token_chunks) * min(w.cfg.router.top_k, stage_experts)


def _miss(pool: float, x: float, k: int) -> float:
    """The chance that k distinct picks among `pool` equally likely experts avoid x of them: C(pool - x, k) /
    C(pool, k), with x real (an expected count) for skewed shares."""
    p = 1.0
    for i in range(k):
        if pool - i <= 0:
            return 0.0
        p *= max(0.0, (pool - x - i) / (pool - i))
    return p


def destination_hits(cfg: ModelConfig, shares: np.ndarray, destinations: list[np.ndarray]) -> np.ndarray:
    """[destinations] the chance that a token's top-k reaches at least one expert of each destination (a set of
    expert ids): the expected rows per token the dispatch sends it.

    Without group limits: K distinct picks, expert e with weight share_e (x = E * the destination's share of
    experts, exact for uniform shares). With DeepSeek's group limits (n_group groups, a token picks from its
    topk_group best groups, and always uses the best expert of each): a destination holding m whole groups is hit
    when one of them is chosen, 1 - C(G - m, TG) / C(G, TG); one holding x experts of a group is hit when the group
    is chosen and its best expert or one of the K - TG other picks (uniform over the chosen groups' other experts)
    lands in the x (groups taken as independent). Tested against simulated routing."""
    E, K = cfg.num_experts, cfg.router.top_k
    G, TG = cfg.router.n_group, cfg.router.topk_group
    shares = np.asarray(shares, dtype=np.float64)
    hits = []
    for experts in destinations:
        experts = np.asarray(experts)
        if G > 1 and TG < G:
            per_group = E // G
            miss = 1.0
            whole = 0
            for g in np.unique(experts // per_group):
                x = int(np.sum(experts // per_group == g))
                if x == per_group:
                    whole += 1
                else:  # chosen with chance TG / G; then missed if its best expert is not among the x and
                    # the K - TG other picks (taken as uniform over the rest of the chosen groups) avoid them
                    pool = TG * per_group - TG
                    missed_if_chosen = (1 - x / per_group) * _miss(pool, x, max(0, K - TG))
                    miss *= 1 - TG / G * (1 - missed_if_chosen)
            miss *= math.comb(G - whole, TG) / math.comb(G, TG)
            hits.append(1 - miss)
        else:
            hits.append(1 - _miss(E, E * float(shares[experts].sum()), K))
    return np.asarray(hits)


def stage_rows(w: Workload, plan: Plan) -> list[np.ndarray]:
    """[stage] -> [devices] expected rows each device receives in the stage, summed over its sources: one per
    (token, destination device) pair (sharding/ep_moe.py)."""
    P, E = w.layout.devices, w.cfg.num_experts
    owned = np.arange(E).reshape(P, E // P)
    if plan.split == "tokens":
        hits = destination_hits(w.cfg, w.shares(), list(owned))
        return [w.tokens / plan.pipeline_degree * hits] * plan.pipeline_degree
    return [w.tokens * destination_hits(w.cfg, w.shares(), list(owned[:, j0:j1]))
            for j0, j1 in plan.expert_groups(E // P)]


def stage_loads(w: Workload, plan: Plan) -> list[np.ndarray]:
    """mu[stage] -> [devices, experts of the stage] expected rows (EP layouts)."""
    P, E = w.layout.devices, w.cfg.num_experts
    mu = (w.assignments * w.shares()).reshape(P, E // P)
    if plan.split == "tokens":
        return [mu / plan.pipeline_degree] * plan.pipeline_degree
    return [mu[:, j0:j1] for j0, j1 in plan.expert_groups(E // P)]


def build_layer(w: Workload, costs: CostModel, plan: Plan = Plan(), *, dense: bool = False,
                collapse: bool = False) -> Schedule:
    """The schedule of one layer (an MoE layer, or with dense=True a dense-FFN layer) of the workload.

    collapse: when every device has the same work (uniform shares), build device 0 only; collectives keep their
    full-size durations, so the makespan is the same (the plan search uses this; charts want every device)."""
    cfg, lay = w.cfg, w.layout
    P, tp = lay.devices, lay.attention_tp
    D, item = cfg.d_model, costs.itemsize
    t_group = w.tokens / lay.attention_dp        # tokens of one attention group (replicated over its TP ranks)
    t_dev = w.tokens / P                         # tokens one device owns inside an EP MoE
    shown = 1 if collapse and _symmetric(w, plan, dense) else P
    C = [f"gpu{d}/compute" for d in range(shown)]
    # Where collectives cannot run beside compute (XLA:CPU: synchronous, no start/done pairs), they take the
    # compute stream, so the simulated pipeline overlaps nothing there either.
    M = [f"gpu{d}/comm" for d in range(shown)] if costs.hw.async_collectives else C
    groups = [range(g * tp, min((g + 1) * tp, shown)) for g in range(-(-shown // tp))]
    kind = "dense" if dense else lay.moe
    sched = Schedule(name=f"{cfg.name} {lay.name} {'dense layer' if dense else plan.describe()}", tokens=w.tokens,
                     meta={"model": cfg.name, "layout": lay.name, "tokens": w.tokens, "seq_len": w.seq_len,
                           "context": w.context, "hardware": costs.hw.name, "dtype": costs.dtype,
                           "plan": plan.as_dict() if kind == "ep" else None, "sources": dict(costs.sources)})
    p = plan.sm_for_comm if kind == "ep" else 0
    sched.sm_partition = {f"gpu{d}": {"compute": costs.hw.sms - p, "comm": p} for d in range(shown)}

    def group_collective(name, kind_, seconds, deps_of, **meta):
        for g, members in enumerate(groups):
            sched.add(f"{name}[g{g}]", kind_, [M[d] for d in members], seconds,
                      [x for d in members for x in deps_of(d)], **meta)
        return lambda d: [f"{name}[g{d // tp}]"]

    t_att = lc.attention_time(costs, cfg, int(round(t_group)), w.seq_len, w.context, tp)
    for d in range(shown):
        sched.add(f"gpu{d}/attention", "attention", C[d], t_att, tokens=t_group, heads=cfg.num_heads // tp)
    after = lambda d: [f"gpu{d}/attention"]  # noqa: E731
    hidden_bytes = t_group * D * item

    if kind == "dense":
        if tp > 1:
            after = group_collective("attn_allreduce", "allreduce", costs.all_reduce(hidden_bytes, tp), after,
                                     bytes=hidden_bytes)
        t_ffn = lc.dense_ffn_time(costs, int(round(t_group)), D, cfg.dense_ffn_dim, tp)
        for d in range(shown):
            sched.add(f"gpu{d}/dense_ffn", "dense_ffn", C[d], t_ffn, after(d))
        if tp > 1:
            group_collective("ffn_allreduce", "allreduce", costs.all_reduce(hidden_bytes, tp),
                             lambda d: [f"gpu{d}/dense_ffn"], bytes=hidden_bytes)
        return sched

    side = lc.side_ffn_width(cfg)
    if kind == "tp":
        return _tp_moe(sched, w, costs, plan, C, groups, group_collective, after, t_group, hidden_bytes, side)

    # Expert parallelism --------------------------------------------------------------------------------------------
    if tp > 1:
        if side:  # the side FFN is TP-split over all the group's tokens: keep them replicated
            after = group_collective("attn_allreduce", "allreduce", costs.all_reduce(hidden_bytes, tp), after,
                                     bytes=hidden_bytes)
        else:
            after = group_collective("attn_reducescatter", "reducescatter",
                                     costs.reduce_scatter(hidden_bytes, tp), after, bytes=hidden_bytes)
    t_router = lc.router_time(costs, cfg, int(round(t_dev)))
    t_permute = lc.permute_time(costs, cfg, t_dev)
    side_tokens = int(round(t_group if tp > 1 else t_dev))
    t_side = lc.dense_ffn_time(costs, side_tokens, D, side, tp, sm_for_comm=p) if side else 0.0
    for d in range(shown):
        sched.add(f"gpu{d}/router", "router", C[d], t_router, after(d))
        sched.add(f"gpu{d}/permute", "permute", C[d], t_permute)
        if side:
            sched.add(f"gpu{d}/side_ffn", "shared_ffn", C[d], t_side, width=side)

    loads = stage_loads(w, plan)
    PN = len(loads)
    # Stages overlap when SMs are reserved for communication, or when collectives run asynchronously beside
    # the GEMMs (XLA:GPU / NCCL); otherwise every collective takes the compute stream in turn.
    overlap = p > 0 or (costs.hw.async_collectives and PN > 1)
    comm = M if overlap else C
    # a dispatched row: the token, and its experts' ids and weights there (int32 + float32 each); a returned row:
    # the weighted sum of their outputs
    meta_bytes = 8 * min(cfg.router.top_k, max(mu.shape[1] for mu in loads))
    dispatch_t, combine_t, gemm_t = [], [], []
    rows = stage_rows(w, plan)
    for s in range(PN):
        rows_PP = np.tile(rows[s][None, :] / P, (P, 1))             # [source, destination] rows this stage
        for out, row_bytes in ((dispatch_t, D * item + meta_bytes), (combine_t, D * item)):
            out.append((costs.all_to_all(rows_PP * row_bytes, sm_for_comm=p), float(rows_PP.sum() * row_bytes)))
    for s, mu in enumerate(loads):
        tiling = plan.tiling(s)
        stage_total = w.assignments / (PN if plan.split == "tokens" else 1)
        # beside GEMM_s run dispatch_{s+1} and combine_{s-1}; a device reads what it sends and writes what it
        # receives (1 / P of each collective's bytes, both ways)
        beside = [t for t in (dispatch_t[s + 1] if s + 1 < PN else None, combine_t[s - 1] if s else None) if t]
        beside = beside if overlap else []
        gemm_t.append(stage_gemm_times(costs, plan.backend(s), mu[:shown], stage_total, D, cfg.expert_ffn_dim,
                                       sm_for_comm=p, tiling=tiling, overlapped_s=sum(t for t, _ in beside),
                                       overlapped_bytes=sum(2 * b / P for _, b in beside),
                                       buffer_rows=ep_buffer_rows(w, plan, mu.shape[1])).tolist())
    permuted = [f"gpu{d}/permute" for d in range(shown)]

    def dispatch(s):
        seconds, nbytes = dispatch_t[s]
        sched.add(f"dispatch_{s}", "dispatch", comm, seconds, permuted, bytes=nbytes, stage=s)

    def gemms(s):
        for d in range(shown):
            sched.add(f"gpu{d}/expert_gemm_{s}", "expert_gemm", C[d], gemm_t[s][d], [f"dispatch_{s}"],
                      stage=s, backend=plan.backend(s), rows=float(loads[s][d].sum()))

    def combine(s):
        seconds, nbytes = combine_t[s]  # the same rows travel back
        sched.add(f"combine_{s}", "combine", comm, seconds, [f"gpu{d}/expert_gemm_{s}" for d in range(shown)],
                  bytes=nbytes, stage=s)

    if not overlap:  # one stage after the other on the compute streams
        for s in range(PN):
            dispatch(s), gemms(s), combine(s)
    else:       # the pipeline: comm issues dispatch_{s+1} before combine_s
        dispatch(0)
        for s in range(PN):
            if s + 1 < PN:
                dispatch(s + 1)
            gemms(s)
            combine(s)
    t_unpermute = lc.unpermute_time(costs, cfg, t_dev)
    for d in range(shown):
        sched.add(f"gpu{d}/unpermute", "unpermute", C[d], t_unpermute, [f"combine_{PN - 1}"])
    if tp > 1:
        last = lambda d: [f"gpu{d}/unpermute"]  # noqa: E731
        if side:
            last = group_collective("side_reducescatter", "reducescatter", costs.reduce_scatter(hidden_bytes, tp),
                                    last, bytes=hidden_bytes)
        group_collective("moe_allgather", "allgather", costs.all_gather(hidden_bytes, tp), last,
                         bytes=hidden_bytes)
    return sched


def _tp_moe(sched, w, costs, plan, C, groups, group_collective, after, t_group, hidden_bytes, side):
    """TP+TP: route every token of the group on every rank, each rank runs all experts at F / tp."""
    cfg, lay = w.cfg, w.layout
    shown, tp, D = len(C), lay.attention_tp, cfg.d_model
    if tp > 1:
        after = group_collective("attn_allreduce", "allreduce", costs.all_reduce(hidden_bytes, tp), after,
                                 bytes=hidden_bytes)
    tokens = int(round(t_group))
    mu = t_group * cfg.router.top_k * w.shares()
    t_ffn = expert_ffn_time(costs, plan.backend(0), mu, t_group * cfg.router.top_k, D, cfg.expert_ffn_dim // tp,
                            tiling=plan.tiling(0))
    t_side = lc.dense_ffn_time(costs, tokens, D, side, tp) if side else 0.0
    for d in range(shown):
        sched.add(f"gpu{d}/router", "router", C[d], lc.router_time(costs, cfg, tokens), after(d))
        sched.add(f"gpu{d}/permute", "permute", C[d], lc.permute_time(costs, cfg, t_group))
        sched.add(f"gpu{d}/expert_gemm_0", "expert_gemm", C[d], t_ffn, backend=plan.backend(0), rows=float(mu.sum()))
        if side:
            sched.add(f"gpu{d}/side_ffn", "shared_ffn", C[d], t_side, width=side)
        sched.add(f"gpu{d}/unpermute", "unpermute", C[d], lc.unpermute_time(costs, cfg, t_group))
    if tp > 1:
        group_collective("moe_allreduce", "allreduce", costs.all_reduce(hidden_bytes, tp),
                         lambda d: [f"gpu{d}/unpermute"], bytes=hidden_bytes)
    return sched
