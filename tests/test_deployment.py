"""epsjax.deployment: one spec, validated in one place, built once (each set-up step runs once, the expert placement
is shared by the weights and the expert compute, the plan says where it came from)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epsjax.deployment import Deployment, DeploymentSpec, RequestShape, SpecError, build
from epsjax.placement import PlanSource

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "tests" / "fixtures" / "hf" / "mixtral"

# Runs `epsjax generate` in-process on 8 virtual devices with the set-up functions wrapped, wherever a module holds
# them, by counters; prints {run: {function: calls}} as JSON on the last line.
COUNTING = r"""
import builtins, collections, io, json, os, sys
import epsjax.cli, epsjax.deployment, epsjax.placement, epsjax.checkpoint, epsjax.scheduler.planner
import epsjax.scheduler.search, epsjax.sharding.rules
from flax import nnx

counts = collections.Counter()

def count(original, name):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)
    for module in list(sys.modules.values()):
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, attr, wrapper)

count(epsjax.sharding.rules.rules_for_model, "rules_for_model")
count(epsjax.scheduler.search.search_plan, "scheduler search")
count(nnx.eval_shape, "nnx.eval_shape")
count(epsjax.checkpoint.read_config, "read_config")
count(epsjax.placement._checked_slots, "expert placement")

def config_reads(original):
    def wrapper(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.basename(os.fsdecode(file)) == "config.json":
            counts["config.json opened"] += 1
        return original(file, *args, **kwargs)
    return wrapper

builtins.open = io.open = config_reads(builtins.open)  # pathlib's read_text opens through io.open

runs = {}
for name, argv in json.loads(sys.argv[1]).items():
    counts.clear()
    assert epsjax.cli.main(["generate", *argv]) == 0
    runs[name] = dict(counts)
print(json.dumps(runs))
"""


def test_generate_on_eight_devices_runs_each_setup_step_once():
    """The README's first command (a preset) and a checkpoint on 8 devices: one rules table, one expert placement,
    one scheduler search (its prediction is printed, not searched again), one abstract model, one config.json read.
    Before epsjax.deployment: rules_for_model 4-6 times, two searches, config.json read four times."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    runs = {"preset": ["--devices", "8", "--max-new-tokens", "2"],
            "checkpoint": ["--devices", "8", "--model", str(MIXTRAL), "--max-new-tokens", "2", "--batch", "8",
                           "--prompt-len", "8"]}
    done = subprocess.run([sys.executable, "-c", COUNTING, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    once = {"rules_for_model": 1, "expert placement": 1, "scheduler search": 1, "nnx.eval_shape": 1}
    assert counts["preset"] == once, counts
    assert counts["checkpoint"] == {**once, "read_config": 1, "config.json opened": 1}, counts
    assert "plan       dp_ep on mesh data=1 tensor=1 expert=8" in done.stdout
    assert "predicted  prefill" in done.stdout


def test_the_placement_and_the_plan_are_made_once_and_shared(tmp_path):
    """6 experts over 4 expert-parallel devices: the weights are stored in the slot order of the same ExpertPlacement
    the expert compute reads; the plan's origin is structured (not a string to parse)."""
    from flax import nnx

    from epsjax.checkpoint import save_checkpoint
    from epsjax.models import MoETransformer, get_preset

    save_checkpoint(MoETransformer(get_preset("tiny-mixtral", num_experts=6), rngs=nnx.Rngs(3)), tmp_path / "m")
    spec = DeploymentSpec(model=str(tmp_path / "m"), strategy="dp_ep", mesh=(1, 1, 4))
    d = build(spec, RequestShape(batch=4, prompt_len=8, max_new_tokens=2), progress=False)
    assert isinstance(d, Deployment) and d.strategy == "dp_ep"
    assert d.expert_slots is not None and d.engine.experts.placement is d.expert_slots
    assert d.model.layers[1].moe.w_gate_EDF.shape[0] == d.expert_slots.num_slots == 8
    assert d.plan.source is PlanSource.UNEVEN_PLACEMENT and d.plan.predicted_prefill_s is None
    assert [name for name, _ in d.steps] == ["config", "strategy", "mesh", "placement", "memory", "plan", "weights",
                                          "engine"]
    assert "experts    6 over 4 devices in 2 slots each" in d.description


def test_scheduler_plan_carries_its_search_and_prediction():
    d = build(DeploymentSpec(preset="tiny-mixtral"), RequestShape(batch=8, prompt_len=16, max_new_tokens=2))
    assert d.strategy == "dp_ep" and d.plan.source is PlanSource.SCHEDULER
    assert d.plan.predicted_prefill_s > 0 and d.plan.prefill.choice.plan.to_expert_plan() == d.plan.plan
    assert d.engine.experts.plan == d.plan.plan and d.rules is d.params.rules
    forced = build(DeploymentSpec(preset="tiny-mixtral", strategy="tp_ep", pipeline_degree=2, split="tokens"),
                   RequestShape(batch=8, prompt_len=16, max_new_tokens=2))
    assert forced.plan.source is PlanSource.FORCED and forced.plan.describe() == "forced"
    assert forced.engine.experts.plan.pipeline_degree == 2


def test_one_device_backend_is_chosen_from_the_padded_request():
    """5 prompts of 20 tokens run as an 8 x 32 prefill (ShapeBuckets): the printed backend is the selector's for
    8 * 32 * top_k / E tokens per expert, as the kernel sees them, not 5 * 20 * top_k / E."""
    from epsjax import pallas_kernels

    d = build(DeploymentSpec(preset="tiny-mixtral", strategy="local"), RequestShape(5, 20, 4))
    cfg = d.cfg
    assert d.backend.padded_shape == (8, 32)
    per_expert = 8 * 32 * cfg.router.top_k / cfg.num_experts
    assert d.backend.prefill_tokens_per_expert == per_expert
    choice = pallas_kernels.select_backend(tokens_per_expert=per_expert, num_experts=cfg.num_experts, k=cfg.d_model,
                                           n=cfg.expert_ffn_dim, dtype=cfg.dtype, op="expert_ffn")
    assert d.backend.prefill == choice.backend
    assert f"GEMM backend {choice.backend} ({per_expert:.1f} tokens/expert of the padded 8x32 prefill" in d.description


@pytest.mark.parametrize("fields,message", [
    (dict(model="m", preset="tiny-mixtral"), "--model m and --preset tiny-mixtral are two models"),
    (dict(strategy="ep"), "--strategy must be one of"),
    (dict(backend="fastest"), "--backend must be auto or one of"),
    (dict(mesh=(1, 0, 8)), "--mesh takes three positive data,tensor,expert sizes"),
    (dict(strategy="local", mesh=(1, 1, 8)), "--strategy local has none"),
    (dict(split="3,5"), "--split takes experts or tokens (EPS pipeline stages), got '3,5'"),
    (dict(split="tokens"), "--split tokens shapes a forced EPS pipeline; add --pipeline-degree"),
    (dict(dep_schedule="pppipe"), "--schedule chooses a DEP schedule; add --strategy dep"),
    (dict(strategy="dep", quantize="fp8"), "--strategy dep takes float experts"),
    (dict(strategy="dp_ep", quantize="fp8"), "--quantize fp8 runs on one device for now; add --strategy local"),
    (dict(offload="lru"), "--offload lru needs --offload-budget FRACTION"),
    (dict(offload_budget=0.5), "--offload-budget sizes the device expert cache of --offload"),
    (dict(offload="lru", offload_budget=0.0), "--offload-budget must be a fraction of the routed-expert bytes in (0, 1]"),
    (dict(offload="lru", offload_budget=1.5), "in (0, 1], got 1.5"),
    (dict(offload="lru", offload_budget=float("nan")), "in (0, 1], got nan"),
    (dict(offload="lfu", offload_budget=0.5, strategy="dp_ep"), "--offload lfu runs on one device"),
    (dict(offload="lru", offload_budget=0.5, quantize="fp8"), "--offload lru takes float experts"),
    (dict(offload="lru", offload_budget=0.5, predictor="p"), "--predictor forecasts routing for --offload expertflow"),
    (dict(offload="fifo", offload_budget=0.5), "--offload must be one of lru, lfu, expertflow"),
])
def test_bad_specs_are_one_line_errors(fields, message):
    with pytest.raises(SpecError) as error:
        DeploymentSpec(**fields)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_build_time_checks():
    with pytest.raises(SpecError, match="3 prompts do not divide over the 8 batch shards"):
        build(DeploymentSpec(preset="tiny-mixtral", strategy="dp_ep"), RequestShape(3, 8, 2))
    with pytest.raises(SpecError, match=r"--split 4,5: 9 devices, but only 8 exist"):
        build(DeploymentSpec(preset="tiny-mixtral", strategy="dep", dep_split=(4, 5)), RequestShape(3, 8, 2))
    with pytest.raises(SpecError, match=r"--offload-budget 0.01 holds \d of tiny-mixtral's \d+ routed experts"):
        build(DeploymentSpec(preset="tiny-mixtral", offload="lru", offload_budget=0.01), RequestShape(2, 8, 2))
    with pytest.raises(SpecError, match="preset tiny-mixtral has random weights and no predictor"):
        build(DeploymentSpec(preset="tiny-mixtral", offload="expertflow", offload_budget=0.5), RequestShape(2, 8, 2))
