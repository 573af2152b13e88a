"""The offloaded runtime: every mode gives the all-on-device run's outputs, exactly, and the device never holds more
expert bytes than the budget."""

import gc

import jax
import numpy as np
import pytest
from flax import nnx

from epsjax.engine import Engine
from epsjax.offload.runtime import OffloadConfig, OffloadEngine
from epsjax.models import LocalExperts, MoETransformer, get_preset
from tests.offload.conftest import prompts_from

STEPS = 6


def run(engine, prompts):
    """All-position prefill logits, then STEPS greedy decode steps: (prefill logits, decode logits, tokens)."""
    tokens, mask = engine.pad_prompts(prompts)
    logits_BTV, state, stats = engine.prefill(tokens, mask, cache_len=64, all_logits=True)
    prefill_logits = np.asarray(logits_BTV)
    next_B = prefill_logits[:, -1].argmax(-1).astype(np.int32)
    decode_logits, out = [], [next_B]
    for _ in range(STEPS):
        logits_BV, state, _ = engine.decode_step(state, next_B)
        decode_logits.append(np.asarray(logits_BV))
        next_B = decode_logits[-1].argmax(-1).astype(np.int32)
        out.append(next_B)
    return prefill_logits, np.stack(decode_logits), np.stack(out, 1)


@pytest.fixture(scope="module")
def prompts(tiny_traces):
    return prompts_from(tiny_traces[0], 3, seed=1)


@pytest.fixture(scope="module")
def device_run(tiny_model, prompts):
    return run(OffloadEngine(tiny_model, OffloadConfig(mode="device")), prompts)


CONFIGS = {
    "on_demand@25%": OffloadConfig(mode="on_demand", budget_fraction=0.25),
    "lru@25%": OffloadConfig(mode="lru", budget_fraction=0.25),
    "lfu@25%": OffloadConfig(mode="lru", budget_fraction=0.25, policy="lfu"),
    "lru@50%,no-split": OffloadConfig(mode="lru", budget_fraction=0.5, split_hits=False),
    "expertflow@25%": OffloadConfig(mode="expertflow", budget_fraction=0.25),
    "expertflow@10%,1-slot": OffloadConfig(mode="expertflow", budget_fraction=0.1, max_inflight=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mode_matches_the_all_on_device_run_exactly(name, tiny_model, trained, prompts, device_run):
    config = CONFIGS[name]
    engine = OffloadEngine(tiny_model, config, predictor=trained[0] if config.mode == "expertflow" else None)
    prefill, decode, tokens = run(engine, prompts)
    np.testing.assert_array_equal(tokens, device_run[2])
    np.testing.assert_array_equal(prefill, device_run[0])  # bitwise: same kernel, every row in exactly one wave
    np.testing.assert_array_equal(decode, device_run[1])
    s = engine.stats
    assert s.peak_device_bytes <= config.budget(engine.store.total_bytes)
    assert s.hits + s.late + s.misses == s.accesses > 0
    if config.mode == "on_demand":
        assert s.hits == 0 and s.loads == s.accesses
    if name.endswith("1-slot"):
        assert engine.cache.num_slots == 1 and s.waves > s.layers  # layers ran in several waves


def test_all_on_device_run_matches_the_plain_engine(tiny_model, prompts, device_run):
    prefill, decode, tokens = run(Engine(tiny_model, experts=LocalExperts()), prompts)
    np.testing.assert_array_equal(tokens, device_run[2])
    np.testing.assert_allclose(prefill, device_run[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(decode, device_run[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-arctic"])
def test_other_families_match_exactly(preset):
    # DeepSeek-V2: MLA, a dense first layer, shared experts, group-limited routing. Arctic: the MoE reads the layer
    # input beside a dense residual MLP.
    model = MoETransformer(get_preset(preset), rngs=nnx.Rngs(1))
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]]
    want = run(OffloadEngine(model, OffloadConfig(mode="device")), prompts)
    got = run(OffloadEngine(model, OffloadConfig(mode="lru", budget_fraction=0.3)), prompts)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    ref = run(Engine(model), prompts)
    np.testing.assert_array_equal(ref[2], want[2])
    np.testing.assert_allclose(ref[1], want[1], atol=2e-5, rtol=1e-5)


def _live_device_bytes(device) -> int:
    return sum(a.nbytes for a in jax.live_arrays()
               if a.sharding.memory_kind == "device" and device in a.devices())


def test_device_memory_stays_within_budget_over_a_long_workload(trained, tiny_traces):
    """A fresh model whose device copy is dropped: from then on the device must hold only the non-expert
    parameters, the KV cache, activations and at most the budget's worth of experts."""
    predictor = trained[0]
    device = jax.devices()[0]
    gc.collect()
    base = _live_device_bytes(device)  # what earlier tests and fixtures (the predictor too) still hold
    model = MoETransformer(get_preset("tiny-mixtral"), rngs=nnx.Rngs(7))
    config = OffloadConfig(mode="expertflow", budget_fraction=0.25)
    engine = OffloadEngine(model, config, predictor=predictor)
    del model
    gc.collect()
    budget = config.budget(engine.store.total_bytes)
    cfg = engine.cfg
    kv_bytes = len(cfg.moe_layers) * 2 * 64 * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # batch 2, 64 slots, k and v
    slack = 64 * 1024  # activations, logits, routing tables of one step
    allowed = engine.non_expert_bytes + kv_bytes + budget + slack
    assert allowed < engine.non_expert_bytes + engine.store.total_bytes  # the check can tell offloading from not
    peak = [0]
    demand = engine.cache.demand

    def checked_demand(layer, experts):
        for table in demand(layer, experts):
            peak[0] = max(peak[0], _live_device_bytes(device) - base)
            assert engine.cache.device_bytes() <= budget
            yield table

    engine.cache.demand = checked_demand
    corpus = tiny_traces[0]
    rng = np.random.default_rng(3)
    for _ in range(5):
        prompts = [corpus[rng.integers(len(corpus)), :rng.integers(2, 16)].tolist() for _ in range(2)]
        engine.generate(prompts, max_new_tokens=12)
    assert 0 < peak[0] <= allowed
    assert engine.stats.peak_device_bytes <= budget and engine.stats.accesses > 100


def test_bad_configs_are_refused(tiny_model, trained):
    deeper = MoETransformer(get_preset("tiny-mixtral", num_layers=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not fit the model"):
        OffloadEngine(deeper, OffloadConfig(mode="expertflow", budget_fraction=0.5), predictor=trained[0])
    with pytest.raises(ValueError, match="exactly one of"):
        OffloadConfig(mode="lru")
    with pytest.raises(ValueError, match="needs a routing predictor"):
        OffloadEngine(tiny_model, OffloadConfig(mode="expertflow", budget_fraction=0.5))
    with pytest.raises(ValueError, match="at least max_inflight"):
        OffloadEngine(tiny_model, OffloadConfig(mode="lru", budget_bytes=100))
    with pytest.raises(ValueError, match="unknown offload mode"):
        OffloadConfig(mode="gpu")
