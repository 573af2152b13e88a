"""What the runtime calls: plan_for, Planner (cache per token bucket, re-plan on drift, force), RoutingHistogram,
Plan <-> ExpertPlan; and the plan-search speed (printed, not asserted)."""

import time

import numpy as np
import pytest

from epsjax.scheduler import Plan, Planner, RoutingHistogram, layout_for, plan_for, search_for
from epsjax.models.config import get_preset
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling
from epsjax.sharding.expert_compute import MoEStats
from epsjax.sharding.plan import ExpertPlan


def test_plan_for_returns_expert_plan():
    cfg = get_preset("deepseek-v2")
    plan = plan_for(cfg, 8, batch=64, seq_len=1024, hardware="h800")
    assert isinstance(plan, ExpertPlan)
    assert plan.pipeline_degree > 1 and plan.split in ("experts", "tokens")
    plan.expert_groups(cfg.num_experts // 8)  # valid for the EP layer's local experts
    # The CPU the tests run on plans from its calibration: no pipeline (its collectives are synchronous).
    assert plan_for(get_preset("tiny-mixtral"), 8, batch=2, seq_len=16).pipeline_degree == 1


def test_layout_for():
    cfg = get_preset("mixtral-8x7b")
    assert layout_for(cfg, {"data": 1, "tensor": 4, "expert": 1}) == (layout_for(cfg, (1, 4, 1))[0], 1)
    layout, replicas = layout_for(cfg, {"data": 2, "tensor": 2, "expert": 2})
    assert (layout.devices, layout.attention_tp, layout.moe, replicas) == (4, 2, "ep", 2)
    layout, _ = layout_for(cfg, 8, "dp_ep")
    assert (layout.devices, layout.attention_tp) == (8, 1)
    assert layout_for(cfg, (1, 4, 1), "tp")[0].moe == "tp"
    with pytest.raises(ValueError, match="rule set"):
        layout_for(cfg, 8, "pp")


def test_plan_conversion_and_validation():
    plan = Plan(4, "experts", backends=("mosaic_gpu",), tilings=((("num_sms", 108),),), sm_for_comm=24)
    expert_plan = plan.to_expert_plan()
    assert (expert_plan.pipeline_degree, expert_plan.split, expert_plan.backends) == (4, "experts", ("mosaic_gpu",))
    assert expert_plan.tilings == (MosaicTiling(num_sms=108),)  # Mosaic GPU's grid leaves 24 SMs free
    dense = Plan(2, backends=("dense",), tilings=((("capacities", (128, 256)),),)).to_expert_plan()
    assert dense.tilings[0].capacities == (128, 256)
    assert plan.expert_groups(10) == ExpertPlan(4).expert_groups(10)
    assert Plan(3, "tokens").token_chunks == 3 and Plan(3, "tokens").expert_groups(5) == ((0, 5),)
    assert plan.as_dict()["tilings"] == [{"num_sms": 108}]
    with pytest.raises(ValueError, match="pipeline_degree"):
        Plan(0)
    with pytest.raises(ValueError, match="backends"):
        Plan(2, backends=("dense", "dense", "dense"))
    with pytest.raises(ValueError, match="split"):
        Plan(2, "rows")
    with pytest.raises(ValueError, match="sm_for_comm"):
        Plan(2, sm_for_comm=-1)


def test_routing_histogram():
    h = RoutingHistogram(num_layers=2, num_experts=4, decay=0.5)
    assert np.allclose(h.shares(), 0.25) and np.allclose(h.skew(), 1.0)
    h.update(np.array([[4, 0, 0, 0], [1, 1, 1, 1]]))           # first update replaces the (empty) prior
    assert np.allclose(h.shares(), [[1, 0, 0, 0], [0.25] * 4])
    h.update(MoEStats(tokens_per_expert=np.array([[0, 4, 0, 0], [1, 1, 1, 1]]), dropped=0))
    assert np.allclose(h.shares()[0], [0.5, 0.5, 0, 0])        # EMA with decay 0.5
    assert np.allclose(h.skew(), [2.0, 1.0])
    h.update(np.array([2, 2, 2, 2]))                           # [E] applies to every layer
    assert h.updates == 3 and h.distance(h.shares()) == 0.0
    with pytest.raises(ValueError, match="tokens_per_expert"):
        h.update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        h.update(-np.ones(4))


def test_planner_caches_and_replans(monkeypatch):
    cfg = get_preset("qwen3-30b-a3b")
    calls = []
    import epsjax.scheduler.planner as planner_mod

    real = planner_mod.search_for
    monkeypatch.setattr(planner_mod, "search_for", lambda *a, **k: calls.append(a) or real(*a, **k))
    planner = Planner(cfg, {"data": 1, "tensor": 1, "expert": 8}, hardware="h800")
    first = planner.plan(16, 1024)
    assert planner.plan(15, 1024) == first and len(calls) == 1      # same token bucket: cached
    planner.plan(64, 1024)
    assert len(calls) == 2                                           # new bucket
    balanced = np.full((len(cfg.moe_layers), cfg.num_experts), 100)
    planner.observe(balanced)
    planner.plan(16, 1024)
    assert len(calls) == 3                                           # first histogram: re-plan
    planner.observe(balanced)
    planner.plan(16, 1024)
    assert len(calls) == 3                                           # no drift
    skewed = balanced.copy()
    skewed[:, :16] *= 6
    for _ in range(10):
        planner.observe(skewed)
    planner.plan(16, 1024)
    assert len(calls) == 4                                           # drifted: re-plan
    forced = ExpertPlan(pipeline_degree=2)
    assert Planner(cfg, 8, hardware="h800", force=forced).plan(16, 1024) is forced


def test_per_layer_loads():
    cfg = get_preset("deepseek-v2")
    counts = np.random.default_rng(0).dirichlet(np.full(cfg.num_experts, 0.5), size=len(cfg.moe_layers)) * 1e4
    choice = search_for(cfg, 8, 64, 1024, counts, "h800")
    assert choice.predicted_s > 0 and choice.predicted_s <= choice.unpipelined_s
    with pytest.raises(ValueError, match="tokens_per_expert"):
        search_for(cfg, 8, 64, 1024, np.ones((3, cfg.num_experts)), "h800")


def test_search_speed_benchmark(capsys):
    """The re-plan cost per batch-size bucket (printed; machine-dependent, so not asserted)."""
    lines = []
    for name, mesh, counts in (("deepseek-v2", 8, None), ("mixtral-8x7b", (1, 4, 1), None),
                               ("qwen3-30b-a3b", 8, None)):
        cfg = get_preset(name)
        for tokens in (8 * 1024, 8 * 8192):
            t0 = time.perf_counter()
            choice = search_for(cfg, mesh, tokens // 1024, 1024, counts, "h800")
            lines.append(f"plan search {name:14s} {tokens:6d} tokens: {1e3 * (time.perf_counter() - t0):7.1f} ms "
                         f"({choice.evaluated} candidates) -> {choice.plan.describe()}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
