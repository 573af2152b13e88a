"""Performance and memory models of DEP deployments, and the expert placement."""

import numpy as np
import pytest

from epsjax.dep import Deployment, ExpertPlacement, TaskCosts, Testbed, expert_bounds, fit_layers
from epsjax.dep.perf import MICRO_KINDS, SEGMENT_KINDS, fit_linear, transfer_time, zipf_shares
from epsjax.scheduler.costs import CostModel
from epsjax.models import get_preset

H20x8 = Testbed("8xH20", "h20", 8)
H20x32 = Testbed("32xH20", "h20", 32)
A6000 = Testbed("8xA6000", "a6000", 8, nvlink_bridges=True)


def test_uneven_expert_placement_worked_example():
    """16 experts over 5 devices: 3, 3, 3, 3, 4 experts in 4 slots each; the empty slots hold -1."""
    p = ExpertPlacement(16, 5)
    assert p.experts_per_device().tolist() == [3, 3, 3, 3, 4] and p.slots == 4
    assert p.owner().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]
    assert p.slot().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    assert p.expert_of_slot().tolist() == [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 12, 13, 14, 15]
    assert expert_bounds(16, 4) == (0, 4, 8, 12, 16)
    with pytest.raises(ValueError):
        expert_bounds(4, 5)


def test_deployments():
    assert Deployment.split(H20x8, 3, 5).attention_devices == (0, 1, 2)
    assert Deployment.split(H20x32, 8, 24).expert_devices == tuple(range(8, 32))
    # One attention GPU per NVLink-bridged pair of A6000s.
    d = Deployment.split(A6000, 3, 5)
    assert d.attention_devices == (0, 2, 4) and d.expert_devices == (1, 3, 5, 6, 7)
    assert Deployment.split(A6000, 4, 4).expert_devices == (1, 3, 5, 7)
    with pytest.raises(ValueError):
        Deployment(H20x8, (0, 1), (1, 2))


@pytest.mark.parametrize("testbed", [H20x8, H20x32, Testbed("8xA10", "a10", 8)])
def test_transfers_without_bridges_are_the_scheduler_all_to_all(testbed):
    rng = np.random.default_rng(0)
    send = rng.uniform(0, 1e7, (testbed.gpus, testbed.gpus)) * (rng.uniform(size=(testbed.gpus,) * 2) < 0.5)
    costs = CostModel.build(testbed.hw, "bfloat16")
    assert transfer_time(send, testbed, costs) == pytest.approx(costs.all_to_all(send), rel=1e-12)


def test_nvlink_bridge_carries_its_pair_beside_pcie():
    """A6000 pair (2, 3): 1 MB over the bridge and 1 MB over PCIe to device 5 run side by side, each on its link."""
    costs = CostModel.build(A6000.hw, "bfloat16")
    hw = A6000.hw
    send = np.zeros((8, 8))
    send[2, 3] = send[2, 5] = 1e6
    pcie = 1e6 / (hw.pcie_per_direction * hw.link_efficiency)
    bridge = 1e6 / (A6000.bridge_gbs * 1e9 / 2 * hw.link_efficiency)
    want = max(hw.pcie_latency_s, hw.nvlink_latency_s) + max(pcie, bridge)
    assert transfer_time(send, A6000, costs) == pytest.approx(want)
    assert bridge < pcie


def test_a2e_bytes_and_time_scale_with_the_routed_rows():
    cfg = get_preset("deepseek-v2")
    costs = TaskCosts(cfg, Deployment.split(H20x8, 3, 5), seq_len=1024)
    send = costs.row_bytes(1000)
    # 1000 tokens x 6 experts x 5120 x 2 bytes from each attention device, split evenly over 5 expert devices.
    assert send.sum() == pytest.approx(3 * 1000 * 6 * 5120 * 2)
    assert send[0, 3] == pytest.approx(1000 * 6 * 5120 * 2 / 5) and send[3, 0] == 0
    assert costs.seconds("a2e", 2000) > costs.seconds("a2e", 1000) > 0
    assert costs.seconds("e2a", 1000) == pytest.approx(costs.seconds("a2e", 1000))


def test_fit_linear_recovers_a_line_and_keeps_coefficients_non_negative():
    xs = np.array([1, 2, 4, 8, 16.0])
    line = fit_linear(xs, 3.0 + 0.5 * xs)
    assert (line.alpha, line.beta) == pytest.approx((3.0, 0.5)) and line.max_rel_err < 1e-12
    falling = fit_linear(xs, 10.0 - 0.1 * xs)   # the best line has beta < 0: constrained to beta = 0
    assert falling.beta == 0.0 and falling.alpha > 0


def test_memory_model():
    cfg = get_preset("qwen3-30b-a3b")
    memory = TaskCosts(cfg, Deployment.split(H20x8, 4, 4), seq_len=1024).memory()
    x = memory.max_tokens(4, 2)
    assert memory.fits(x, 4, 2) and not memory.fits(x * 1.01, 4, 2)
    assert memory.max_tokens(8, 2) < x            # more micro-batches in flight: smaller ones
    # Expert device: 32 of 128 experts x 48 layers x 3 x 2048 x 768 x 2 bytes.
    assert memory.eg_fixed == 32 * 48 * 3 * 2048 * 768 * 2


def test_fit_layers_truncates_what_does_not_fit():
    deployment = Deployment.split(A6000, 3, 5)
    cfg = fit_layers(get_preset("deepseek-v2"), deployment)
    assert 1 < cfg.num_layers < 60 and cfg.dense_layers == (0,)
    memory = TaskCosts(cfg, deployment, seq_len=1).memory()
    assert memory.eg_fixed <= 0.75 * memory.eg_limit
    bigger = TaskCosts(cfg.replace(num_layers=cfg.num_layers + 1), deployment, seq_len=1).memory()
    assert bigger.eg_fixed > 0.75 * bigger.eg_limit or bigger.ag_fixed > 0.75 * bigger.ag_limit
    assert fit_layers(get_preset("qwen3-30b-a3b"), Deployment.split(H20x8, 4, 4)).num_layers == 48


def test_skewed_routing_loads_the_busiest_expert_device():
    """Zipf(1.2) shares over DeepSeek-V2's 160 experts on 5 expert devices: the most loaded device gets more than
    its fifth of the rows, receives that share of the A2E bytes, and sets the expert group's time."""
    cfg = get_preset("deepseek-v2")
    deployment = Deployment.split(H20x8, 3, 5)
    uniform = TaskCosts(cfg, deployment, seq_len=1024)
    assert zipf_shares(160, 0.0) == pytest.approx([1 / 160] * 160)
    flat = TaskCosts(cfg, deployment, seq_len=1024, routing=tuple([7.0] * 160))   # any scale: normalised
    assert flat.seconds("experts", 1000) == pytest.approx(uniform.seconds("experts", 1000), rel=1e-12)
    skewed = TaskCosts(cfg, deployment, seq_len=1024, routing=zipf_shares(160, 1.2))
    busiest = int(np.argmax(skewed.device_shares))
    assert skewed.imbalance == pytest.approx(5 * skewed.device_shares[busiest]) and skewed.imbalance > 1.2
    send = skewed.row_bytes(1000)
    assert send[0, deployment.expert_devices[busiest]] == pytest.approx(
        1000 * 6 * 5120 * 2 * skewed.device_shares[busiest])
    assert skewed.seconds("experts", 1000) > uniform.seconds("experts", 1000)
    assert skewed.seconds("a2e", 1000) > uniform.seconds("a2e", 1000)
    assert skewed.memory().eg_step > uniform.memory().eg_step
    with pytest.raises(ValueError, match="routing"):
        TaskCosts(cfg, deployment, seq_len=1024, routing=(1.0, 2.0))


@pytest.mark.parametrize("seq_len,context,zipf", [(1024, 0, None), (1, 4096, 1.2)])
def test_task_durations_never_fall_with_more_tokens(seq_len, context, zipf):
    """What the TTFT-bound search rests on (epsjax/dep/workloads.py within_budget): every duration is
    nondecreasing in the tokens of its task, so a shape's step time is too."""
    cfg = get_preset("qwen3-30b-a3b")
    routing = None if zipf is None else zipf_shares(cfg.num_experts, zipf)
    costs = TaskCosts(cfg, Deployment.split(Testbed("8xA10", "a10", 8), 4, 4), seq_len, context, routing=routing)
    xs = np.unique(np.round(np.geomspace(1, 64 * seq_len, 40)))
    for kind in MICRO_KINDS + SEGMENT_KINDS:
        ts = [costs.seconds(kind, x) for x in xs]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(ts, ts[1:])), kind
