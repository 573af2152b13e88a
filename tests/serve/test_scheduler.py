"""The continuous-batching loop alone, over a fake generator (tests/serve/fake.py): admission, retirement, the
bounded queue, cancellation, failures that stay with their request, stop strings."""

import threading
import time

import pytest

from epsjax.generation import SamplingParams
from epsjax.serve.metrics import Metrics
from epsjax.serve.scheduler import QueueFull, Scheduler
from tests.serve.fake import POISON, FakeGenerator, expected


class Collector:
    """Each request's Outputs, and an event set when it finishes."""

    def __init__(self):
        self.outputs, self.done = {}, {}

    def emit(self, rid):
        self.outputs[rid], self.done[rid] = [], threading.Event()

        def emit(output):
            self.outputs[rid].append(output)
            if output.finished:
                self.done[rid].set()
        return emit

    def wait(self, rid, timeout=10):
        assert self.done[rid].wait(timeout), f"request {rid} did not finish in {timeout} s"
        return self.outputs[rid]

    def tokens(self, rid):
        return [t for o in self.wait(rid) for t in o.tokens]


@pytest.fixture
def make():
    made = []

    def make(generator=None, **kw):
        kw = {"num_slots": 2, "cache_len": 64, "max_queue": 8} | kw
        s = Scheduler(generator or FakeGenerator(), metrics=Metrics(), **kw).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop(5)


def test_more_requests_than_slots_all_get_their_tokens(make):
    s, c = make(), Collector()
    prompts = {i: [i, 3 * i + 1] for i in range(6)}
    for i, p in prompts.items():
        s.submit(i, p, SamplingParams(max_new_tokens=3 + i), c.emit(i))
    for i, p in prompts.items():
        assert c.tokens(i) == expected(p, 3 + i)
        last = c.outputs[i][-1]
        assert last.finish_reason == "length" and last.completion_tokens == 3 + i and last.prompt_tokens == 2
    m = s.metrics
    assert m.requests.labels("finished")._value.get() == 6 and m.generated_tokens._value.get() == sum(range(3, 9))


def test_a_stop_token_finishes_with_stop(make):
    s, c = make(), Collector()
    s.submit("a", [10], SamplingParams(max_new_tokens=10, stop_token_ids=(13,)), c.emit("a"))
    assert c.tokens("a") == [11, 12, 13] and c.outputs["a"][-1].finish_reason == "stop"


def test_a_full_queue_refuses(make):
    s, c = make(FakeGenerator(step_seconds=0.05), num_slots=1, max_queue=1), Collector()
    s.submit(0, [1], SamplingParams(max_new_tokens=50), c.emit(0))
    deadline = time.monotonic() + 5
    while s.running == 0:  # the first is in the slot, the queue is empty
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s.submit(1, [1], SamplingParams(max_new_tokens=2), c.emit(1))
    with pytest.raises(QueueFull):
        s.submit(2, [1], SamplingParams(max_new_tokens=2), c.emit(2))
    s.cancel(0)
    assert c.tokens(1) == [2, 3]


def test_cancel_frees_the_slot_and_drops_a_waiting_request(make):
    s, c = make(FakeGenerator(step_seconds=0.02), num_slots=1), Collector()
    s.submit("long", [1], SamplingParams(max_new_tokens=60), c.emit("long"))
    s.submit("waiting", [1], SamplingParams(max_new_tokens=60), c.emit("waiting"))
    s.submit("next", [5], SamplingParams(max_new_tokens=2), c.emit("next"))
    time.sleep(0.1)
    s.cancel("waiting")
    s.cancel("long")
    assert c.tokens("next") == [6, 7]  # got the slot without waiting for the 60-token requests
    assert not c.done["long"].is_set() and not c.done["waiting"].is_set()
    assert s.metrics.requests.labels("cancelled")._value.get() == 2
    assert s.slots.free == [0] and s.running == 0


def test_a_failing_request_fails_alone(make):
    g = FakeGenerator()
    g.go.clear()
    s, c = make(g, num_slots=4), Collector()
    s.submit("block", [1], SamplingParams(max_new_tokens=3), c.emit("block"))  # admitted alone; its step waits
    deadline = time.monotonic() + 5
    while s.running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for rid, p in (("a", [1, 2]), ("bad", [POISON]), ("b", [4])):
        s.submit(rid, p, SamplingParams(max_new_tokens=3), c.emit(rid))
    g.go.set()  # the three are admitted together after the step
    assert c.tokens("a") == expected([1, 2], 3) and c.tokens("b") == expected([4], 3)
    bad = c.wait("bad")
    assert bad[-1].error and "poisoned prompt" in bad[-1].error and bad[-1].finished
    assert g.inserts == [1, 3, 1, 1, 1]  # block; the group of 3 failed, then each alone


def test_a_failing_step_fails_the_running_requests_and_the_server_goes_on(make):
    g = FakeGenerator()
    g.fail_steps = True
    s, c = make(g), Collector()
    s.submit("x", [1], SamplingParams(max_new_tokens=5), c.emit("x"))
    assert "the device fell over" in c.wait("x")[-1].error
    g.fail_steps = False
    s.submit("y", [1], SamplingParams(max_new_tokens=3), c.emit("y"))
    assert c.tokens("y") == [2, 3, 4]


class Letters:
    """A tokenizer: token t is the letter chr(97 + t % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)


def test_stop_strings_cut_the_text_and_free_the_slot(make):
    s, c = make(tokenizer=Letters(), steps=1), Collector()
    s.submit("a", [0], SamplingParams(max_new_tokens=20), c.emit("a"), stop=("fg", "zz"))
    out = c.wait("a")
    assert "".join(o.text for o in out) == "bcde" and out[-1].finish_reason == "stop"
    assert [t for o in out for t in o.tokens][:6] == [1, 2, 3, 4, 5, 6]
    deadline = time.monotonic() + 5
    while s.slots.free != [0, 1]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # without a stop string hit, the text streams whole
    s.submit("b", [0], SamplingParams(max_new_tokens=4), c.emit("b"), stop=("zz",))
    assert "".join(o.text for o in c.wait("b")) == "bcde"
