"""A fake generator for the scheduler: DecodeSlots' contract without a model (style.md item 11).

Request r's token i is (last prompt token + i + 1) % 100; a prompt holding POISON fails its prefill; a step may be
made slow (seconds per step) so requests pile up, or held (`go` cleared) until the test lets it go."""

import threading
import time

from epsjax.generation import RequestError, SlotEvent

POISON = 99


def expected(prompt, n):
    return [(prompt[-1] + i + 1) % 100 for i in range(n)]


class FakeSlots:
    def __init__(self, generator, num_slots, cache_len):
        self.generator, self.num_slots, self.cache_len = generator, num_slots, cache_len
        self.requests = [None] * num_slots
        self.live = {}  # slot -> [prompt, produced, max_new, stop ids]

    @property
    def free(self):
        return [i for i, r in enumerate(self.requests) if r is None]

    @property
    def busy(self):
        return any(r is not None for r in self.requests)

    def insert(self, prompts, sampling, *, ids=None, max_new_tokens=16, stop_at_eos=True):
        self.generator.inserts.append(len(prompts))
        if any(POISON in p for p in prompts):
            raise RequestError("poisoned prompt")
        free, events = self.free, []
        for prompt, params, rid in zip(prompts, sampling, ids):
            token = expected(prompt, 1)[0]
            stops = params.stop_token_ids
            done = params.max_new_tokens == 1 or token in stops
            slot = -1
            if not done:
                slot = free.pop(0)
                self.requests[slot] = rid
                self.live[slot] = [prompt, 1, params.max_new_tokens, stops]
            events.append(SlotEvent(rid, slot, [token], done))
        return events

    def step(self, num_steps=1):
        assert self.generator.go.wait(10), "the test never let the step go"
        if self.generator.step_seconds:
            time.sleep(self.generator.step_seconds)
        if self.generator.fail_steps:
            raise RuntimeError("the device fell over")
        events = []
        for slot, (prompt, produced, max_new, stops) in list(self.live.items()):
            tokens, done = [], False
            while len(tokens) < num_steps and not done:
                token = expected(prompt, produced + 1)[-1]
                produced += 1
                tokens.append(token)
                done = produced >= max_new or token in stops
            self.live[slot][1] = produced
            events.append(SlotEvent(self.requests[slot], slot, tokens, done))
            if done:
                self.release([slot])
        return events

    def release(self, slots):
        for s in list(slots):
            self.requests[int(s)] = None
            self.live.pop(int(s), None)


class FakeGenerator:
    buckets = None

    def __init__(self, step_seconds=0.0):
        self.step_seconds, self.fail_steps, self.inserts = step_seconds, False, []
        self.go = threading.Event()  # cleared: steps wait for it (the test decides what arrives meanwhile)
        self.go.set()

    def open_slots(self, num_slots, cache_len):
        return FakeSlots(self, num_slots, cache_len)
