"""Decode slots and per-request sampling (epsjax.generation) in the jitted executor (one device, an EP mesh with
the expert pipeline) and the offload executor: requests inserted while others decode get exactly the tokens of a
batch generate of the same prompts; freed slots are reused; per-prompt sampling equals each prompt alone; mixing
sampling settings compiles nothing new."""

import numpy as np
import pytest
from flax import nnx

from epsjax import placement, sharding
from epsjax.compilation import CompileCounter
from epsjax.engine import Engine, RequestError, SamplingParams
from epsjax.models import MoETransformer, get_preset
from epsjax.offload.runtime import OffloadConfig, OffloadEngine

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 101], [250, 1, 64, 64, 3, 9, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
           [3], [11, 12, 13, 14]]
SAMPLED = [SamplingParams(temperature=0.8, top_p=0.9, seed=7), SamplingParams(),
           SamplingParams(temperature=1.2, top_k=20, seed=3), SamplingParams(temperature=0.5, seed=11),
           SamplingParams(temperature=1.0, top_p=0.5, top_k=5, seed=2**32 - 1)]
NEW = 7


@pytest.fixture(scope="module")
def model():
    return MoETransformer(get_preset("tiny-mixtral"), rngs=nnx.Rngs(0))


def staggered(engine, prompts, sampling, *, arrivals, num_slots, cache_len=64, max_new_tokens=NEW):
    """Each request joins at decode step arrivals[i] (or as soon after as a slot is free), one decode step at a
    time: its tokens by request."""
    slots = engine.open_slots(num_slots, cache_len)
    out = {i: [] for i in range(len(prompts))}
    waiting, step = list(range(len(prompts))), 0
    while waiting or slots.busy:
        due = [i for i in waiting if arrivals[i] <= step][:len(slots.free)]
        if due:
            events = slots.insert([prompts[i] for i in due], [sampling[i] for i in due], ids=due,
                                  max_new_tokens=max_new_tokens, stop_at_eos=False)
            for e in events:
                out[e.request] += e.tokens
            waiting = [i for i in waiting if i not in due]
        for e in slots.step(1):
            out[e.request] += e.tokens
        step += 1
        assert step < 200
    assert not slots.busy and len(slots.free) == num_slots
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_inserted_requests_equal_a_batch_generate(model, sampled):
    engine = Engine(model)
    sampling = SAMPLED if sampled else [SamplingParams()] * len(PROMPTS)
    want = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=sampling, stop_at_eos=False).tokens
    # 5 requests through 2 slots: joining at steps 0, 0, 3, 4 and 5, so slots are freed and reused.
    got = staggered(engine, PROMPTS, sampling, arrivals=[0, 0, 3, 4, 5], num_slots=2)
    assert got == want
    assert all(len(t) == NEW for t in got)


def test_per_prompt_sampling_equals_each_prompt_alone(model):
    engine = Engine(model)
    together = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED, stop_at_eos=False).tokens
    alone = [engine.generate([p], max_new_tokens=NEW, sampling=s, stop_at_eos=False).tokens[0]
             for p, s in zip(PROMPTS, SAMPLED)]
    assert together == alone
    # a different seed changes a sampled request's tokens (the streams are not ignored)
    other = engine.generate(PROMPTS[:1], max_new_tokens=NEW, sampling=SamplingParams(temperature=0.8, top_p=0.9,
                                                                                      seed=8), stop_at_eos=False)
    assert other.tokens[0] != together[0]


def test_per_request_budgets_and_stop_tokens(model):
    engine = Engine(model)
    free = engine.generate(PROMPTS[:2], max_new_tokens=NEW, stop_at_eos=False).tokens
    stop = free[1][2]  # request 1 stops at its third token; request 0 takes 3 tokens
    params = [SamplingParams(max_new_tokens=3), SamplingParams(stop_token_ids=(stop,))]
    out = engine.generate(PROMPTS[:2], max_new_tokens=NEW, sampling=params, stop_at_eos=False).tokens
    assert out[0] == free[0][:3]
    assert out[1] == free[1][:free[1].index(stop) + 1]


def test_mixing_sampling_settings_compiles_nothing_new(model):
    engine = Engine(model)
    engine.generate(PROMPTS[:4], max_new_tokens=NEW, sampling=SamplingParams(), stop_at_eos=False)
    with CompileCounter() as compiled:
        engine.generate(PROMPTS[:4], max_new_tokens=NEW, sampling=SAMPLED[:4], stop_at_eos=False)
        engine.generate(PROMPTS[:4], max_new_tokens=NEW, sampling=SAMPLED[1:], stop_at_eos=False)
    assert compiled.programs == 0


def test_slot_requests_are_checked(model):
    engine = Engine(model)
    slots = engine.open_slots(2, 32)
    with pytest.raises(RequestError, match="exceed the slots' cache length 32"):
        slots.insert([[1] * 20], [SamplingParams()], max_new_tokens=20)
    slots.insert([[1, 2], [3]], [SamplingParams()] * 2, max_new_tokens=4)
    with pytest.raises(RequestError, match="1 requests for 0 free slots"):
        slots.insert([[4]], [SamplingParams()])
    with pytest.raises(RequestError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[1]], sampling=[SamplingParams()] * 2)
    with pytest.raises(RequestError, match="top_k must be an integer >= 0"):
        SamplingParams(top_k=-1)


def test_an_ep_mesh_with_the_pipeline(model):
    cfg = model.cfg
    mesh = sharding.make_mesh(tensor=2, expert=4)
    experts, _ = placement.ep_experts(cfg, mesh, "tp_ep", batch=4, seq_len=32,
                                      plan=sharding.ExpertPlan(2, "tokens"))
    assert experts.plan.pipeline_degree == 2
    sharded = placement.create_sharded_model(cfg, mesh, "tp_ep", 0)
    engine = Engine(sharded, experts=experts, batch_sharding=sharding.batch_sharding(mesh, "tp_ep"))
    sampling = [SamplingParams()] * 2 + SAMPLED[2:4]
    prompts = PROMPTS[:4]
    want = Engine(model).generate(prompts, max_new_tokens=NEW, sampling=sampling, stop_at_eos=False).tokens
    assert engine.generate(prompts, max_new_tokens=NEW, sampling=sampling, stop_at_eos=False).tokens == want
    got = staggered(engine, prompts, sampling, arrivals=[0, 2, 2, 5], num_slots=4)
    assert got == want


@pytest.mark.parametrize("mode", ["lru", "device"])
def test_the_offload_executor(model, mode):
    budget = {"budget_fraction": 0.5} if mode != "device" else {}
    engine = OffloadEngine(model, OffloadConfig(mode=mode, **budget))
    sampling = SAMPLED[:2] + [SamplingParams()] * 2
    prompts = PROMPTS[:4]
    want = Engine(model).generate(prompts, max_new_tokens=5, sampling=sampling, stop_at_eos=False).tokens
    assert engine.generate(prompts, max_new_tokens=5, sampling=sampling, stop_at_eos=False).tokens == want
    got = staggered(engine, prompts, sampling, arrivals=[0, 1, 1, 3], num_slots=2, max_new_tokens=5)
    assert got == want
