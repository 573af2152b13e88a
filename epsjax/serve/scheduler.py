"""The continuous-batching loop: requests in, tokens out, over any generator's DecodeSlots.

One background thread owns the slots (the only thread that calls the engine). Other threads talk to it through
`submit` and `cancel` (a lock-guarded queue and set); it answers each request through the request's `emit`
callback, called on the scheduler thread with an Output (the HTTP side wraps it in loop.call_soon_threadsafe).

Every iteration:
    cancel  requests whose client went away: dropped from the queue, or their slot released
    admit   waiting requests (FIFO) into free slots, several prefilled together when their length bucket and
            budgets fit the slots' cache; their first tokens are emitted
    step    `steps` decode steps over the live slots (small, so that waiting requests join quickly)
    emit    each request's new tokens (and text, with a tokenizer); retire on max_tokens, EOS, stop ids and stop
            strings (the slot is released at once)

A request that fails in the engine (its prefill, or insert) fails alone: a group insert that raises is retried one
request at a time. A decode step that raises fails the requests in the slots, which are reopened empty.
The scheduler only knows the generator's narrow interface (open_slots, buckets, cfg): tests drive it with a fake.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable

from epsjax.generation import SamplingParams


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already (HTTP 429)."""


class ShuttingDown(Exception):
    """The scheduler is stopping: no new requests (HTTP 503)."""


@dataclasses.dataclass
class Output:
    """What a request produced since its last Output."""

    tokens: list[int]
    text: str = ""                    # the tokens' new text (with a tokenizer), stop strings cut off
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop id, stop string) | "length" (max_tokens) | None
    error: str | None = None          # the request failed in the engine (finished is True)
    prompt_tokens: int = 0
    completion_tokens: int = 0        # generated tokens so far


@dataclasses.dataclass(eq=False)
class _Request:
    id: object
    prompt: tuple[int, ...]
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_at_eos: bool
    emit: Callable[[Output], None]
    arrival: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0                     # characters of text emitted
    first_token: float | None = None
    slot: int = -1


class Scheduler:
    """Continuous batching over `generator.open_slots(num_slots, cache_len)` (module docstring).

    max_queue: waiting requests beyond which submit raises QueueFull. steps: decode steps per iteration.
    max_admit: requests prefilled together at most. tokenizer: for text and stop strings (None: token ids only).
    metrics: an epsjax.serve.metrics.Metrics to update (or None)."""

    def __init__(self, generator, *, num_slots: int, cache_len: int, max_queue: int = 64, steps: int = 2,
                 max_admit: int = 4, tokenizer=None, metrics=None):
        self.generator, self.num_slots, self.cache_len = generator, num_slots, cache_len
        self.max_queue, self.steps, self.max_admit = max_queue, steps, max_admit
        self.tokenizer, self.metrics = tokenizer, metrics
        self.slots = generator.open_slots(num_slots, cache_len)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set = set()
        self._running: dict[object, _Request] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.slots_total.set(num_slots)

    # Any thread -----------------------------------------------------------------------------------------------

    def submit(self, id, prompt, sampling: SamplingParams, emit: Callable[[Output], None], *,
               stop: tuple[str, ...] = (), stop_at_eos: bool = True) -> None:
        """Queues a request (sampling.max_new_tokens is its budget); raises QueueFull past max_queue, ShuttingDown
        once stop() was called."""
        request = _Request(id, tuple(prompt), sampling, tuple(stop), stop_at_eos, emit, time.perf_counter())
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests); retry later")
            self._waiting.append(request)
            self._gauges()
            self._wake.notify()

    def cancel(self, id) -> None:
        """Stops a request (its client went away): no more Outputs; its slot is released before the next step."""
        with self._wake:
            self._cancelled.add(id)
            self._wake.notify()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="epsjax-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The loop thread runs (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # The scheduler thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._cancelled or self._running):
                    self._wake.wait(1.0)
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                if cancelled:
                    kept = [r for r in self._waiting if r.id not in cancelled]
                    for _ in range(len(self._waiting) - len(kept)):
                        self._outcome("cancelled")
                    self._waiting = collections.deque(kept)
                group = self._admissible()
            try:
                self._cancel_running(cancelled)
                if group:
                    self._admit(group)
                    self._gauges()
                if self._running:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug here fails the requests in flight, not the server
                self._reset(_reason(e))
            self._gauges()
        for r in list(self._running.values()) + list(self._waiting):
            self._fail(r, "the server is shutting down")

    def _admissible(self) -> list[_Request]:
        """The waiting requests (FIFO) to prefill together: as many as there are free slots (at most max_admit)
        while every one's budget fits the cache after the group's longest prompt bucket, all with the same
        stop_at_eos. Holds the lock."""
        free = min(len(self.slots.free), self.max_admit)
        group, longest = [], 0
        while self._waiting and len(group) < free:
            r = self._waiting[0]
            if r.stop_at_eos != (group or [r])[0].stop_at_eos:  # insert takes one stop_at_eos per group
                break
            longest_with = max(longest, len(r.prompt))
            entries = self._entries(longest_with)
            if group and any(entries + q.sampling.max_new_tokens > self.cache_len for q in group + [r]):
                break
            group.append(self._waiting.popleft())
            longest = longest_with
        return group

    def _entries(self, tokens: int) -> int:
        buckets = self.generator.buckets
        return tokens if buckets is None else buckets.length(tokens)

    def _cancel_running(self, cancelled: set) -> None:
        slots = []
        for id in cancelled:
            r = self._running.pop(id, None)
            if r is not None:
                slots.append(r.slot)
                self._outcome("cancelled")
        if slots:
            self.slots.release(slots)

    def _admit(self, group: list[_Request]) -> None:
        try:
            events = self.slots.insert([r.prompt for r in group], [r.sampling for r in group],
                                       ids=list(range(len(group))),
                                       stop_at_eos=group[0].stop_at_eos)
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the others down
            if len(group) > 1:
                for r in group:
                    self._admit([r])
            else:
                self._fail(group[0], _reason(e))
            return
        now = time.perf_counter()
        for event in events:
            r = group[event.request]
            r.first_token = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - r.arrival)
                self.metrics.prompt_tokens.inc(len(r.prompt))
            r.slot = event.slot
            if not event.finished:
                self._running[r.id] = r
            self._emit(r, event.tokens, event.finished)

    def _step(self) -> None:
        try:
            events = self.slots.step(self.steps)
        except Exception as e:  # noqa: BLE001 - the requests in the slots fail; the server goes on
            self._reset(_reason(e))
            return
        by_slot = {r.slot: r for r in self._running.values()}
        for event in events:
            r = by_slot.get(event.slot)
            if r is not None:
                self._emit(r, event.tokens, event.finished)

    def _emit(self, r: _Request, tokens: list[int], finished: bool) -> None:
        """Appends the request's new tokens, cuts at a stop string, sends the Output; retires a finished one."""
        r.tokens += tokens
        text, reason = "", None
        if self.tokenizer is not None:
            full = self.tokenizer.decode(r.tokens)
            cut = min((i for i in (full.find(s, max(0, r.sent - len(s))) for s in r.stop) if i >= 0), default=-1)
            if cut >= 0:
                full, finished, reason = full[:cut], True, "stop"
            end = len(full)
            if not finished:  # hold back what may start a stop string, or an incomplete character
                end -= max((len(s) - 1 for s in r.stop), default=0)
                while end > r.sent and full[end - 1] == "\ufffd":
                    end -= 1
            end = max(end, r.sent)
            text, r.sent = full[r.sent:end], end
        if finished and reason is None:
            reason = "length" if len(r.tokens) >= r.sampling.max_new_tokens else "stop"
        if self.metrics is not None:
            self.metrics.generated_tokens.inc(len(tokens))
        if finished:
            if self._running.pop(r.id, None) is not None and self.slots.requests[r.slot] is not None:
                self.slots.release([r.slot])  # a stop string: the slot is still live
            self._outcome("finished")
            self._gauges()  # before the client hears it finished
            if self.metrics is not None and len(r.tokens) > 1:
                self.metrics.tpot.observe((time.perf_counter() - r.first_token) / (len(r.tokens) - 1))
        _call(r.emit, Output(tokens, text, finished, reason, prompt_tokens=len(r.prompt),
                             completion_tokens=len(r.tokens)))

    def _reset(self, reason: str) -> None:
        """Fails every request in a slot and reopens the slots empty (their state is not to be trusted)."""
        for r in list(self._running.values()):
            self._fail(r, reason)
        self._running.clear()
        self.slots = self.generator.open_slots(self.num_slots, self.cache_len)

    def _fail(self, r: _Request, reason: str) -> None:
        self._outcome("failed")
        _call(r.emit, Output([], finished=True, error=reason, prompt_tokens=len(r.prompt),
                             completion_tokens=len(r.tokens)))

    def _outcome(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.waiting.set(len(self._waiting))
            self.metrics.running.set(len(self._running))
            self.metrics.slots_used.set(self.num_slots - len(self.slots.free))


def _reason(e: Exception) -> str:
    traceback.print_exception(e)
    return f"the engine failed on this request: {type(e).__name__}: {e}"[:500]


def _call(emit, output: Output) -> None:
    try:
        emit(output)
    except Exception as e:  # noqa: BLE001 - a broken callback (its event loop closed) stops no other request
        traceback.print_exception(e)
