"""DEP decode slots (continuous batching): requests inserted into a DEPEngine's slots at different decode steps, and
slots freed and reused, give exactly the tokens of one batch generate of the same prompts, greedy and seeded
sampling (each request samples from its own stream); per-prompt sampling settings in one generate equal each prompt
generated alone. Rows go from a prefilled state into slots of a state with other micro-batch sizes.

Kept cheap (2 cores): Qwen3-MoE on 4+4 under FinDEP (2 micro-batches), prompts of at most 16 tokens and caches of
32 entries, so that every batch of 1..8 prompts and every slot state of up to 8 slots is 2 micro-batches of 4 rows:
the batch generate, the slots' decode steps and the single-prompt generates share their step programs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epsjax.dep import DEPGroups, DEPSchedule
from epsjax.dep.runtime import DEPRuntime
from epsjax.engine import RequestError, SamplingParams
from epsjax.models import get_preset
from tests.dep.conftest import tiny_model

NAME = "tiny-qwen3-moe"
PROMPTS = [[5, 17, 33], [7], [250, 1], [9, 8, 7, 6], [44, 45]]
NEW = 6
CACHE = 32  # the batch generate's cache bucket: 16 prompt slots + NEW
SCHEDULE = DEPSchedule.findep(2, 2, "AASS")
GREEDY = [SamplingParams()] * len(PROMPTS)
SAMPLED = [SamplingParams(temperature=0.8, top_p=0.9, seed=11 + 5 * i) for i in range(len(PROMPTS))]


@functools.cache
def _engine():
    runtime = DEPRuntime(tiny_model(NAME), DEPGroups.split(4, 4, get_preset(NAME).num_experts))
    return runtime.engine(SCHEDULE)


@functools.cache
def _batch(sampling: tuple, max_new: int = NEW):
    return _engine().generate(PROMPTS, max_new_tokens=max_new, sampling=list(sampling), stop_at_eos=False).tokens


def staggered(engine, prompts, sampling, *, arrivals, num_slots, max_new_tokens=NEW):
    """Each request joins at decode step arrivals[i] (or as soon after as a slot is free), one decode step at a
    time: its tokens by request, and the slots each request took. Every step routes exactly the live requests'
    rows (K per MoE layer): free slots and the micro-batches' padding rows route nothing."""
    slots = engine.open_slots(num_slots, CACHE)
    assert engine.executor.cache_shape(slots.state) == (num_slots, CACHE)
    out, taken = {i: [] for i in range(len(prompts))}, {}
    waiting, step, K = list(range(len(prompts))), 0, engine.cfg.router.top_k
    while waiting or slots.busy:
        due = [i for i in waiting if arrivals[i] <= step][:len(slots.free)]
        if due:
            for e in slots.insert([prompts[i] for i in due], [sampling[i] for i in due], ids=due,
                                  max_new_tokens=max_new_tokens, stop_at_eos=False):
                out[e.request] += e.tokens
                taken[e.request] = e.slot
            waiting = [i for i in waiting if i not in due]
        live = sum(r is not None for r in slots.requests)
        for e in slots.step(1):
            out[e.request] += e.tokens
        if live:
            log = engine.transfer_logs[-1]
            for layer in engine.cfg.moe_layers:
                assert sum(r.rows for r in log.records if r.kind == "a2e" and r.layer == layer) == live * K
        step += 1
        assert step < 100
    assert not slots.busy and slots.free == list(range(num_slots))
    assert not any(np.asarray(st.active_B).any() for st in slots.state.micro)
    assert engine.executor.longest(slots.state) == 0
    return [out[i] for i in range(len(prompts))], [taken[i] for i in range(len(prompts))]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_inserted_requests_equal_a_batch_generate(sampling):
    """Requests joining at steps 0, 0, 2, 3 and 3 (prefilled alone or in twos, into slots of both micro-batches
    while the others decode) get the batch generate's tokens."""
    engine = _engine()
    want = _batch(tuple(sampling))
    if sampling is SAMPLED:
        assert want != _batch(tuple(GREEDY))  # sampling did change something
    got, taken = staggered(engine, PROMPTS, sampling, arrivals=[0, 0, 2, 3, 3], num_slots=8)
    assert got == want and all(len(t) == NEW for t in got)
    assert taken == [0, 1, 2, 3, 4]  # slot 4: the state's second micro-batch (2 x 4 rows)


def test_freed_slots_are_reused():
    """Seven requests (greedy and sampled, budgets of 2 to 4 tokens) through 3 slots: each joins as soon as a slot
    is free, and a reused slot gives its new request the batch generate's tokens."""
    engine = _engine()
    prompts = PROMPTS + [[3, 3, 3], [100, 2, 60, 61, 62]]
    sampling = [SamplingParams(temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=3 + i, max_new_tokens=2 + i % 3)
                for i in range(len(prompts))]
    want = engine.generate(prompts, max_new_tokens=NEW, sampling=sampling, stop_at_eos=False).tokens
    assert [len(t) for t in want] == [2 + i % 3 for i in range(len(prompts))]
    got, taken = staggered(engine, prompts, sampling, arrivals=[0] * len(prompts), num_slots=3)
    assert got == want
    assert sorted(set(taken)) == [0, 1, 2] and len(taken) == 7  # every slot used, some twice or more


def test_per_prompt_sampling_equals_each_prompt_alone():
    """One generate mixing greedy, top-p, top-k and seeds gives each prompt the tokens it gets alone."""
    engine = _engine()
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
                SamplingParams(temperature=1.2, top_k=5, seed=2), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
                SamplingParams(temperature=0.5, seed=2**32 - 1)]
    together = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=sampling, stop_at_eos=False).tokens
    alone = [engine.generate([p], max_new_tokens=NEW, sampling=s, stop_at_eos=False).tokens[0]
             for p, s in zip(PROMPTS, sampling)]
    assert together == alone
    # the seeds are not ignored: request 1 with another seed draws other tokens
    other = engine.generate(PROMPTS[1:2], max_new_tokens=NEW, sampling=SamplingParams(temperature=0.8, top_p=0.9,
                                                                                       seed=8), stop_at_eos=False)
    assert other.tokens[0] != together[1]


def test_insert_maps_rows_between_micro_batch_sizes():
    """A prefilled state of 2 micro-batches of 4 rows (cache 16) into 16 slots (2 micro-batches of 8, cache 32):
    source row 5 (micro-batch 1, row 1) goes to slot 9 (micro-batch 1, row 1), source row 1 to slot 2 (micro-batch
    0, row 2), each with its cache entries at [0, 16), lengths, positions and activity; release frees one of them
    only."""
    runtime = _engine().runtime
    new = runtime.empty_state(6, 16, SCHEDULE)
    assert new.rows_per_micro == 4 and new.batch == 6

    def tagged(m, st):  # every entry of global row g holds g + 1
        tag_B = 1 + m * 4 + np.arange(4)
        return dataclasses.replace(
            st, cache=jax.tree.map(lambda a: jnp.broadcast_to(
                jnp.asarray(tag_B, a.dtype).reshape((4,) + (1,) * (a.ndim - 1)), a.shape), st.cache),
            kv_valid_BS=jnp.arange(16)[None] < jnp.asarray(tag_B)[:, None], next_position_B=jnp.asarray(10 + tag_B),
            write_index_B=jnp.asarray(tag_B), active_B=jnp.ones(4, bool))

    new = dataclasses.replace(new, micro=tuple(tagged(m, st) for m, st in enumerate(new.micro)))
    state = runtime.insert(runtime.empty_state(16, 32, SCHEDULE), new, [5, 1], [9, 2])
    assert state.rows_per_micro == 8 and (state.batch, state.cache_len) == (16, 32)
    for m, row, tag in ((1, 1, 6), (0, 2, 2)):
        st = state.micro[m]
        for layer in st.cache:
            for a in layer.values():
                a = np.asarray(a, np.float32)
                assert (a[row, :16] == tag).all() and (a[row, 16:] == 0).all()
                assert (np.delete(a, row, axis=0) == 0).all()
        np.testing.assert_array_equal(np.asarray(st.kv_valid_BS)[row], np.arange(32) < tag)
        assert (int(st.next_position_B[row]), int(st.write_index_B[row])) == (10 + tag, tag)
        np.testing.assert_array_equal(np.asarray(st.active_B), np.arange(8) == row)
    assert runtime.longest(state) == 6
    state = runtime.release(state, [9])
    assert not np.asarray(state.micro[1].active_B).any() and not np.asarray(state.micro[1].kv_valid_BS).any()
    assert int(state.micro[1].write_index_B[1]) == 0 and runtime.longest(state) == 2
    with pytest.raises(RequestError, match="longer than the slots'"):
        runtime.insert(new, state, [0], [0])


def test_slot_errors():
    engine = _engine()
    slots = engine.open_slots(2, 16)
    with pytest.raises(RequestError, match="exceed the slots' cache length"):
        slots.insert([PROMPTS[0]], [SamplingParams()], max_new_tokens=NEW)
    with pytest.raises(RequestError, match="outside the state's 2 rows"):
        engine.executor.release(slots.state, [2])
    with pytest.raises(RequestError, match="DEPState"):
        engine.executor.insert(slots.state, object(), [0], [0])
