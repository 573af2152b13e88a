"""The runtime takes the scheduler's plan by default and a forced one on request (bench_prefill and the CLI)."""

import json
import sys
from pathlib import Path

from epsjax import sharding
from epsjax import placement
from epsjax.models import get_preset

ROOT = Path(__file__).resolve().parents[2]


def test_ep_experts_default_plan_comes_from_the_scheduler():
    cfg = get_preset("mixtral-8x7b")
    mesh = sharding.make_mesh(tensor=2, expert=4)
    experts, source = placement.ep_experts(cfg, mesh, "tp_ep", batch=16, seq_len=2048, hardware="h800")
    assert source.startswith("scheduler: predicted"), source
    from epsjax.scheduler import plan_for
    assert experts.plan == plan_for(cfg, dict(mesh.shape), 16, 2048, rule_set="tp_ep", hardware="h800")


def test_ep_experts_forced_plan_and_cpu_default():
    cfg = get_preset("tiny-mixtral")
    mesh = sharding.make_mesh(expert=8)
    forced = sharding.ExpertPlan(pipeline_degree=2, split="tokens")
    experts, source = placement.ep_experts(cfg, mesh, "dp_ep", batch=8, seq_len=16, plan=forced)
    assert source == "forced" and experts.plan == forced
    # CPU: planned from the committed calibration (epsjax/scheduler/calibrations/cpu.json); XLA:CPU's collectives
    # are synchronous, so no pipeline pays there.
    experts, source = placement.ep_experts(cfg, mesh, "dp_ep", batch=8, seq_len=16)
    assert experts.plan.pipeline_degree == 1 and source.startswith("scheduler: predicted")


def test_bench_prefill_runs_the_scheduler_row(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_prefill

    out = tmp_path / "bench.json"
    rows = bench_prefill.main(["--preset", "tiny-qwen3-moe", "--batch", "8", "--seq", "16", "--repeats", "1",
                               "--strategies", "dp_ep", "--pipeline-degrees", "2", "--json", str(out)])
    labels = [r["strategy"] for r in rows]
    assert labels == ["DP+EP", "EPS DP+EP (scheduler)", "EPS DP+EP"]
    assert rows[1]["plan_source"].startswith("scheduler") and rows[2]["plan_source"] == "forced"
    assert all(r["max_logit_diff"] < 1e-4 for r in rows)
    assert json.loads(out.read_text())["rows"][2]["pipeline_degree"] == 2
