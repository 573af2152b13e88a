"""Layer task graphs and the plan search: the closed-form unpipelined layer, and the search's properties
(more bandwidth never slower; never loses to the best fixed pipeline degree; reacts to skewed loads)."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from epsjax.scheduler import CostModel, Layout, Plan, Workload, build_layer, search_plan, simulate
from epsjax.scheduler import layer_costs as lc
from epsjax.scheduler.schedules import destination_hits, stage_gemm_times
from epsjax.models.config import get_preset

COSTS = CostModel.build("h800", use_profiles=False)
MODELS = {"deepseek-v2": "dp", "mixtral-8x7b": "tp", "dbrx": "tp", "arctic": "tp", "qwen3-30b-a3b": "dp"}


@st.composite
def workloads(draw, devices=(2, 4, 8), max_tokens=8192):
    name = draw(st.sampled_from(sorted(MODELS)))
    cfg = get_preset(name)
    P = draw(st.sampled_from([p for p in devices if cfg.num_experts % p == 0 and cfg.num_heads % p == 0]))
    attention = draw(st.sampled_from(["dp", "tp"]))
    layout = Layout.dp_ep(P) if attention == "dp" else Layout.tp_ep(P)
    tokens = P * draw(st.sampled_from([128, 512, 2048, max_tokens]))
    skew = draw(st.sampled_from([None, 0.3, 2.0]))
    load = None
    if skew is not None:
        load = tuple(np.random.default_rng(draw(st.integers(0, 9))).dirichlet(np.full(cfg.num_experts, skew)) + 1e-6)
    return Workload(cfg, layout, tokens, seq_len=draw(st.sampled_from([256, 1024])), expert_load=load)


def closed_form_unpipelined(w: Workload, costs: CostModel, backend: str) -> float:
    """The TP/DP + EP layer written out: every step after the other, the all-to-alls waiting for all devices."""
    cfg, lay = w.cfg, w.layout
    P, tp, D = lay.devices, lay.attention_tp, cfg.d_model
    t_group, t_dev = w.tokens / lay.attention_dp, w.tokens / P
    hidden = t_group * D * costs.itemsize
    side = lc.side_ffn_width(cfg)
    t = lc.attention_time(costs, cfg, int(round(t_group)), w.seq_len, w.context, tp)
    if tp > 1:
        t += costs.all_reduce(hidden, tp) if side else costs.reduce_scatter(hidden, tp)
    t += lc.router_time(costs, cfg, int(round(t_dev))) + lc.permute_time(costs, cfg, t_dev)
    if side:
        t += lc.dense_ffn_time(costs, int(round(t_group if tp > 1 else t_dev)), D, side, tp)
    mu = (w.tokens * cfg.router.top_k * w.shares()).reshape(P, -1)
    # one row per (token, device): the token with its experts' ids and weights there, back without them
    rows_to = w.tokens * destination_hits(cfg, w.shares(), list(np.arange(cfg.num_experts).reshape(P, -1)))
    rows_PP = np.repeat(rows_to[None, :] / P, P, axis=0)
    meta = 8 * min(cfg.router.top_k, cfg.num_experts // P)
    dispatch = costs.all_to_all(rows_PP * (D * costs.itemsize + meta))
    combine = costs.all_to_all(rows_PP * D * costs.itemsize)
    buffer_rows = P * (w.tokens // P) * min(cfg.router.top_k, cfg.num_experts // P)  # ep_moe's FFN buffer
    gemm = stage_gemm_times(costs, backend, mu, w.tokens * cfg.router.top_k, D, cfg.expert_ffn_dim,
                            buffer_rows=buffer_rows).max()
    t += dispatch + gemm + combine + lc.unpermute_time(costs, cfg, t_dev)
    if tp > 1:
        t += (costs.reduce_scatter(hidden, tp) if side else 0.0) + costs.all_gather(hidden, tp)
    return t


@settings(max_examples=25, deadline=None)
@given(workloads(), st.sampled_from(["mosaic_gpu", "dense"]))
def test_pn1_reproduces_unpipelined(w, backend):
    t = simulate(build_layer(w, COSTS, Plan(1, backends=(backend,)))).makespan
    assert t == pytest.approx(closed_form_unpipelined(w, COSTS, backend), rel=1e-9)
    # The one-device view of a balanced layer has the same makespan as the full one.
    assert simulate(build_layer(w, COSTS, Plan(1, backends=(backend,)), collapse=True)).makespan == pytest.approx(t)


def test_pipeline_overlaps():
    """A pipelined layer: dispatch_1 runs while GPU 0 computes (the shared experts or GEMM_0), combine_0 while it
    runs a later stage's GEMM, and the layer is shorter than unpipelined."""
    w = Workload(get_preset("deepseek-v2"), Layout.dp_ep(8), 8 * 8192, 1024)
    t = simulate(build_layer(w, COSTS, Plan(4, backends=("mosaic_gpu",), sm_for_comm=24)))

    def overlaps(a, b):
        return t.start[a] < t.end[b] and t.end[a] > t.start[b]

    assert any(overlaps("dispatch_1", task) for task in ("gpu0/side_ffn", "gpu0/expert_gemm_0"))
    assert any(overlaps("combine_0", f"gpu0/expert_gemm_{s}") for s in (1, 2, 3))
    assert t.start["gpu0/expert_gemm_1"] >= t.end["dispatch_1"] and t.start["combine_0"] >= t.end["gpu7/expert_gemm_0"]
    assert t.makespan < simulate(build_layer(w, COSTS, Plan(1, backends=("mosaic_gpu",)))).makespan
    assert w.cfg.num_experts // 8 == 20 and len({x.name for x in t.schedule.tasks if x.kind == "dispatch"}) == 4


def test_tp_tp_layer():
    w = Workload(get_preset("mixtral-8x7b"), Layout.tp_tp(4), 4 * 1024, 1024)
    tasks = build_layer(w, COSTS, Plan(backends=("dense",))).tasks
    kinds = [x.kind for x in tasks]
    assert kinds.count("allreduce") == 2 and "dispatch" not in kinds
    assert [x.streams for x in tasks if x.kind == "allreduce"][0] == tuple(f"gpu{d}/comm" for d in range(4))


def faster_links(costs: CostModel, factor: float) -> CostModel:
    hw = costs.hw.replace(nvlink_gbs=costs.hw.nvlink_gbs * factor, pcie_gbs=costs.hw.pcie_gbs * factor,
                          network_gbs=costs.hw.network_gbs * factor)
    return dataclasses.replace(costs, hw=hw)


@settings(max_examples=12, deadline=None)
@given(workloads(max_tokens=2048), st.floats(1.0, 8.0), st.integers(1, 4), st.sampled_from(["experts", "tokens"]),
       st.sampled_from([0, 8, 24]))
def test_more_bandwidth_never_slower(w, factor, pn, split, sm):
    fast = faster_links(COSTS, factor)
    if split == "experts":
        pn = min(pn, w.cfg.num_experts // w.layout.devices)
    plan = Plan(pn, split, backends=("mosaic_gpu",), sm_for_comm=sm)
    assert (simulate(build_layer(w, fast, plan)).makespan
            <= simulate(build_layer(w, COSTS, plan)).makespan * (1 + 1e-12))
    assert (search_plan(w, fast, max_pipeline=6, tight_tilings=False).predicted_s
            <= search_plan(w, COSTS, max_pipeline=6, tight_tilings=False).predicted_s * (1 + 1e-12))


@settings(max_examples=10, deadline=None)
@given(workloads(max_tokens=4096))
def test_never_loses_to_best_fixed_pn(w):
    """Brute force, independently of the search: every fixed (split, PN) with every uniform backend and SM
    split; the searched plan is at least as fast as the best of them."""
    choice = search_plan(w, COSTS, max_pipeline=6, tight_tilings=False)
    local = w.cfg.num_experts // w.layout.devices
    shapes = [("experts", pn) for pn in range(1, min(local, 6) + 1)] + [("tokens", pn) for pn in (2, 4)]
    best = min(simulate(build_layer(w, COSTS, Plan(pn, split, backends=(b,), sm_for_comm=sm))).makespan
               for split, pn in shapes for b in COSTS.backends for sm in (0, 8, 16, 24, 32))
    assert choice.predicted_s <= best * (1 + 1e-9)
    assert choice.predicted_s <= choice.unpipelined_s
    plan_t = simulate(build_layer(w, COSTS, choice.plan)).makespan
    assert plan_t == pytest.approx(choice.predicted_s, rel=1e-9)


def test_reacts_to_skew():
    """A hot expert (16x the others' share): the uniform plan cuts stages by experts, so the hot expert's stage
    stalls the pipeline; the load-aware plan differs (today: token chunks, which spread it over every stage) and
    beats the uniform plan on the skewed load. Skew costs time: the fullest device sets the pace."""
    cfg = get_preset("deepseek-v2")
    w = Workload(cfg, Layout.dp_ep(8), 8 * 8192, 1024)
    shares = np.ones(cfg.num_experts)
    shares[0] = 16.0
    skewed = w.replace(expert_load=tuple(shares))
    uniform_choice = search_plan(w, COSTS, tight_tilings=False)
    skew_choice = search_plan(skewed, COSTS, tight_tilings=False)
    assert skew_choice.plan != uniform_choice.plan
    uniform_plan_on_skew = simulate(build_layer(skewed, COSTS, uniform_choice.plan)).makespan
    assert skew_choice.predicted_s < uniform_plan_on_skew
    assert skew_choice.predicted_s > uniform_choice.predicted_s
    assert skew_choice.unpipelined_s > uniform_choice.unpipelined_s


@settings(max_examples=10, deadline=None)
@given(workloads(max_tokens=2048), st.floats(1.5, 6.0))
def test_hot_device_costs_time(w, heat):
    """From a uniform load, making one device's experts hotter never makes the best plan faster (from a skewed
    load it can: the device that was the slowest gets less)."""
    w = w.replace(expert_load=None)
    P, E = w.layout.devices, w.cfg.num_experts
    shares = w.shares().copy()
    shares[: E // P] *= heat
    hot = w.replace(expert_load=tuple(shares / shares.sum()))
    assert (search_plan(hot, COSTS, max_pipeline=6, tight_tilings=False).predicted_s
            >= search_plan(w, COSTS, max_pipeline=6, tight_tilings=False).predicted_s * (1 - 1e-3))


def _routed_destinations(cfg, owned, tokens, seed):
    """Monte-Carlo: the mean number of destinations (expert sets) a token's top-k reaches, routing like the model
    (softmax scores; DeepSeek's group-limited greedy choice where the config has groups)."""
    rng = np.random.default_rng(seed)
    E, K, G, TG = cfg.num_experts, cfg.router.top_k, cfg.router.n_group, cfg.router.topk_group
    scores = rng.normal(size=(tokens, E))
    if G > 1:
        best_group = scores.reshape(tokens, G, E // G).max(axis=2)
        chosen = np.argsort(-best_group, axis=1)[:, :TG]
        allowed = np.zeros((tokens, G), bool)
        np.put_along_axis(allowed, chosen, True, axis=1)
        scores = np.where(np.repeat(allowed, E // G, axis=1), scores, -np.inf)
    top = np.argsort(-scores, axis=1)[:, :K]
    where = np.zeros(E, int)
    for i, experts in enumerate(owned):
        where[experts] = i
    return np.mean([len(set(where[row])) for row in top])


@pytest.mark.parametrize("name, P, stages", [("deepseek-v2", 8, 1), ("deepseek-v2", 8, 2), ("deepseek-v2", 16, 1),
                                             ("deepseek-v2", 4, 1), ("mixtral-8x7b", 8, 1), ("mixtral-8x7b", 4, 2),
                                             ("qwen3-30b-a3b", 8, 1), ("dbrx", 8, 1)])
def test_destination_hits_match_routing(name, P, stages):
    """The expected rows per token of the dispatch's cost model against routing simulated like the model."""
    cfg = get_preset(name)
    owned = np.arange(cfg.num_experts).reshape(P, stages, -1).transpose(1, 0, 2).reshape(P * stages, -1)
    expected = destination_hits(cfg, np.full(cfg.num_experts, 1 / cfg.num_experts), list(owned)).sum()
    simulated = _routed_destinations(cfg, owned, 4000, seed=0)
    assert expected == pytest.approx(simulated, rel=0.05), (expected, simulated)
    if name == "deepseek-v2" and P == 8 and stages == 1:
        assert expected == pytest.approx(cfg.router.topk_group)  # one group per device: exactly 3 devices


# ------------------------------------------------------------------- overlap without reserved SMs (issue 14)

def _tasks(sched):
    return {t.name: t for t in sched.tasks}


def test_async_collectives_overlap_without_reserved_sms_and_slow_the_gemms_they_share():
    w = Workload(get_preset("deepseek-v2-lite"), Layout.dp_ep(8), 8 * 4096, seq_len=1024)
    async_plan, serial_plan = Plan(2, "experts"), Plan(2, "experts")
    overlapped = build_layer(w, COSTS, async_plan)
    timeline = simulate(overlapped)
    # dispatch_1 runs on the comm streams while stage 0's GEMMs run on the compute streams
    assert "gpu0/comm" in _tasks(overlapped)["dispatch_1"].streams
    assert timeline.start["dispatch_1"] < timeline.start["gpu0/expert_gemm_0"] + _tasks(overlapped)[
        "gpu0/expert_gemm_0"].duration
    # where collectives cannot run asynchronously (XLA:CPU), the same plan runs stage after stage
    serial = build_layer(w, dataclasses.replace(COSTS, hw=COSTS.hw.replace(async_collectives=False)), serial_plan)
    assert "gpu0/compute" in _tasks(serial)["dispatch_1"].streams
    assert simulate(serial).makespan > timeline.makespan
    # the GEMMs that share the GPU with a collective pay for it (SMs and HBM), and more the more they share
    gemm_async = _tasks(overlapped)["gpu0/expert_gemm_0"].duration
    gemm_serial = _tasks(serial)["gpu0/expert_gemm_0"].duration
    assert gemm_async > gemm_serial
    heavier = dataclasses.replace(COSTS, hw=COSTS.hw.replace(async_comm_sms=40))
    assert _tasks(build_layer(w, heavier, async_plan))["gpu0/expert_gemm_0"].duration > gemm_async


def test_a_measured_interference_decides_between_async_overlap_and_reserved_sms():
    w = Workload(get_preset("mixtral-8x7b"), Layout.tp_ep(8), 8 * 4096, seq_len=1024)
    free = search_plan(w, dataclasses.replace(COSTS, hw=COSTS.hw.replace(overlap_interference=0.0)))
    costly = search_plan(w, dataclasses.replace(COSTS, hw=COSTS.hw.replace(overlap_interference=3.0)))
    assert free.plan.pipeline_degree > 1 and free.plan.sm_for_comm == 0  # overlap for nothing: nothing reserved
    assert costly.plan.sm_for_comm > 0 or costly.plan.pipeline_degree == 1
    assert costly.predicted_s > free.predicted_s
