"""The routing-path predictor: forecast helpers as worked examples; trained on traces from a tiny Mixtral it beats
the temporal-locality baseline's recall and LRU's hit ratio (replayed and in the runtime); save / load."""

import numpy as np
import pytest

from epsjax.offload import metrics, simulate
from epsjax.offload.predictor import RoutingPredictor, routing_targets, union_topk_scores
from epsjax.offload.runtime import OffloadConfig, OffloadEngine
from tests.offload.conftest import prompts_from


def test_union_topk_scores_worked_example():
    # Two tokens, one layer, four experts, top-2: token 0 picks {0, 1}, token 1 picks {1, 3}; the union is {0, 1, 3},
    # each scored by its best probability.
    probs = np.array([[[0.9, 0.8, 0.1, 0.0]], [[0.2, 0.6, 0.1, 0.7]]])
    np.testing.assert_allclose(union_topk_scores(probs, 2), [[0.9, 0.8, 0.0, 0.7]])


def test_routing_targets_and_batch_recall_worked_example():
    # One layer, E=4, k=1, two sequences (one batch) of three steps. Routed: seq 0 -> 0, 0, 1; seq 1 -> 2, 3, 3.
    ids = np.array([[0, 0, 1], [2, 3, 3]])[:, :, None, None]
    assert routing_targets(ids, 4)[1, 2, 0].tolist() == [0, 0, 0, 1]
    # The predictor puts all its mass on the right expert except at seq 1, step 1 (predicts 2 instead of 3).
    probs = routing_targets(ids, 4)
    probs[1, 1, 0] = [0, 0, 1, 0]
    r = metrics.batch_recall(probs, ids, batch_size=2, start=1)
    # Steps 1 and 2: true sets {0, 3} and {1, 3}; predicted {0, 2} and {1, 3}: 3 of 4 found.
    # Temporal (previous step's sets {0, 2} and {0, 3}): 1 + 1 of 4.
    np.testing.assert_allclose(r["predictor_recall"], [0.75])
    np.testing.assert_allclose(r["temporal_recall"], [0.5])
    np.testing.assert_allclose(metrics.topk_recall(probs, ids), [5 / 6])


def test_predictor_beats_the_temporal_baseline_on_held_out_traces(trained):
    predictor, tokens, ids = trained
    probs = np.asarray(predictor.probs(tokens))
    per_token = metrics.topk_recall(probs, ids)
    for batch_size in (1, 4):
        r = metrics.batch_recall(probs, ids, batch_size=batch_size)
        assert np.all(r["predictor_recall"] > r["temporal_recall"]), r
        # It does not win by predicting more experts than the baseline does.
        assert np.all(r["predictor_set_size"] <= r["temporal_set_size"] + 0.5)
    assert np.all(per_token > 0.6), per_token


@pytest.mark.parametrize("slots", [6, 12])  # 25% and 50% of the 24 experts
def test_predictor_beats_lru_hit_ratio_on_replayed_traces(trained, slots):
    predictor, tokens, ids = trained
    probs = np.asarray(predictor.probs(tokens))
    lru = simulate.replay_decode(ids, batch_size=4, num_slots=slots, policy="lru")
    flow = simulate.replay_decode(ids, batch_size=4, num_slots=slots, policy="predictor", forecast="predictor",
                                  probs_NTLE=probs)
    assert flow.hit_ratio > lru.hit_ratio + 0.2, (flow.hit_ratio, lru.hit_ratio)


def test_expertflow_beats_lru_hit_ratio_in_the_runtime(tiny_model, trained):
    predictor, tokens, _ = trained
    prompts = prompts_from(tokens, 2, seed=5)
    results = {}
    for mode in ("lru", "expertflow"):
        engine = OffloadEngine(tiny_model, OffloadConfig(mode=mode, budget_fraction=0.5), predictor=predictor)
        out = engine.generate(prompts, max_new_tokens=24)
        results[mode] = (out.tokens, engine.stats)
    assert results["lru"][0] == results["expertflow"][0]
    lru, flow = results["lru"][1], results["expertflow"][1]
    assert flow.hit_ratio > lru.hit_ratio, (flow.as_dict(), lru.as_dict())


def test_save_and_load_round_trip(trained, tmp_path):
    predictor, tokens, _ = trained
    loaded = RoutingPredictor.load(predictor.save(tmp_path / "predictor"))
    assert loaded.config == predictor.config
    np.testing.assert_array_equal(np.asarray(loaded.probs(tokens[:4])), np.asarray(predictor.probs(tokens[:4])))
