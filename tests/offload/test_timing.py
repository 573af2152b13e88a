"""The offload timing model: worked timelines on a virtual clock (copies vs compute), the published-size mapping of
routing traces, and the decode costs' basic properties."""

import dataclasses

import numpy as np
import pytest

from epsjax.offload import simulate, timing, traces
from epsjax.scheduler.costs import CostModel
from epsjax.models import get_preset


@dataclasses.dataclass
class FixedCosts:
    """A DecodeCosts stand-in with round numbers: copies 1.0 s per expert, attention 0.5 s, 0.25 s per expert run."""

    cfg: object
    copy: float = 1.0

    def h2d_seconds(self):
        return self.copy

    def attention(self):
        return 0.5

    def experts(self, rows):
        return 0.25 * len(rows)

    def finish(self):
        return 0.0

    def head(self):
        return 0.0

    def dense_layer(self):
        return 0.0


CFG = get_preset("tiny-mixtral", num_layers=1)
# One sequence, one decode step (t = 1), one MoE layer, routed to experts 0 and 1.
IDS = np.array([[[[0, 1]], [[0, 1]]]], np.int32)  # [N=1, T=2, L=1, K=2]


def test_on_demand_waits_for_every_copy():
    # attention 0 -> 0.5; both misses copy back to back on one engine: 0.5 -> 1.5 -> 2.5; the wave runs both
    # experts 2.5 -> 3.0. The compute stream waited 2.0 s.
    r = simulate.replay(IDS, batch_size=1, num_slots=4, policy="lru", keep=False, max_inflight=2, num_experts=8,
                        timing=FixedCosts(CFG))
    assert r.seconds == pytest.approx(3.0)
    assert r.stall_seconds == pytest.approx(2.0)
    assert r.copy_seconds == pytest.approx(2.0)
    assert r.tokens == 1 and r.stats.misses == 2


def test_prefetch_overlaps_copies_with_attention():
    # A perfect forecast starts both copies at the step's start (0 -> 1 -> 2) while attention runs 0 -> 0.5; the
    # layer waits until 2.0 and runs its wave 2.0 -> 2.5: 0.5 s saved against on-demand loading.
    pred_ids = IDS.copy()
    pred_scores = np.ones(IDS.shape, np.float32)
    r = simulate.replay(IDS, batch_size=1, num_slots=4, policy="predictor", forecast="predictor", max_inflight=2,
                        pred_ids_NTLK=pred_ids, pred_scores_NTLK=pred_scores, num_experts=8, timing=FixedCosts(CFG))
    assert r.seconds == pytest.approx(2.5)
    assert r.stats.late == 2 and r.stats.misses == 0
    # the predictor runs before the step (as OffloadEngine.decode_step): its 0.25 s delays the copies and the step
    slow = simulate.replay(IDS, batch_size=1, num_slots=4, policy="predictor", forecast="predictor",
                           max_inflight=2, pred_ids_NTLK=pred_ids, pred_scores_NTLK=pred_scores, num_experts=8,
                           timing=FixedCosts(CFG), predictor_seconds=0.25)
    assert slow.seconds == pytest.approx(2.75)


def test_resident_experts_need_no_copy_and_hits_run_while_misses_copy():
    # Two steps of the same routing with an LRU cache: step 1 as on-demand (3.0 s); step 2 hits both (0.5 + 0.5).
    ids = np.array([[[[0, 1]], [[0, 1]], [[0, 2]]]], np.int32)  # steps t=1: {0, 1}; t=2: {0, 2}
    r = simulate.replay(ids, batch_size=1, num_slots=4, policy="lru", max_inflight=2, num_experts=8,
                        timing=FixedCosts(CFG))
    # t=2: attention 3.0 -> 3.5; expert 0 resident runs 3.5 -> 3.75 while expert 2 copies 3.5 -> 4.5; its wave
    # 4.5 -> 4.75.
    assert r.seconds == pytest.approx(4.75)
    assert r.stats.hits == 1 and r.stats.misses == 3


def test_map_routing_keeps_expert_blocks_and_top_k():
    tokens = np.array([[5, 9, 5]])
    ids = np.array([[[[0, 3]], [[1, 2]], [[0, 3]]]])  # [1, 3, 1, 2]: small model, 4 experts top-2
    big = traces.map_routing(ids, tokens, small_experts=4, num_layers=3, num_experts=16, top_k=4)
    assert big.shape == (1, 3, 3, 4)
    assert ((big[..., :2] // 4) == ids[:, :, [0, 0, 0], :1]).all()  # the first two come from expert 0's block
    assert all(len(set(row)) == 4 for row in big.reshape(-1, 4).tolist())  # distinct experts per token
    assert (big[0, 0] == big[0, 2]).all()  # same token, same small routing -> same experts
    padded = traces.map_routing(np.full((1, 1, 1, 2), -1), np.zeros((1, 1)), small_experts=4, num_layers=2,
                                num_experts=16, top_k=4)
    assert (padded == -1).all()
    with pytest.raises(ValueError, match="multiples"):
        traces.map_routing(ids, tokens, small_experts=4, num_layers=3, num_experts=10, top_k=4)


def test_decode_costs_grow_with_experts_and_copies_follow_pcie():
    cfg = get_preset("mixtral-8x7b")
    a100, h100 = (timing.DecodeCosts(cfg, CostModel.build(hw), batch=4, context=256) for hw in ("a100", "h100"))
    assert a100.expert_bytes == 3 * 4096 * 14336 * 2
    assert a100.h2d_seconds() == pytest.approx(2 * h100.h2d_seconds(), rel=0.01)  # PCIe 4 vs 5
    assert a100.experts([1, 1]) > a100.experts([1]) > 0
    # decoding reads an expert's weights once: two rows of one expert cost about what one row does
    assert a100.experts([2]) == pytest.approx(a100.experts([1]), rel=0.05)
    assert a100.h2d_seconds() > 10 * a100.experts([1])  # why offloaded decoding is copy-bound
