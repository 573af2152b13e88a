"""`epsjax serve`: an OpenAI-compatible HTTP server over any engine's decode slots.

Three parts, each testable without the others (style.md items 11, 12):

    protocol.py   request bodies -> checked requests (SamplingParams); OpenAI error bodies      no HTTP, no engine
    scheduler.py  the continuous-batching loop over DecodeSlots, in one background thread       no HTTP
    app.py        aiohttp.web endpoints, SSE, API key, body limit, /metrics                      thin

    server = make_server(deployment.engine, model_name="m", num_slots=8, cache_len=1024)
    with Background(server) as port:      # tests and scripts: its own event loop in a thread
        ...                               # http://127.0.0.1:{port}/v1/completions
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from epsjax.compilation import CompileCounter
from epsjax.errors import EpsjaxError
from epsjax.generation import SamplingParams
from epsjax.serve.app import Server, start
from epsjax.serve.metrics import Metrics
from epsjax.serve.protocol import Limits
from epsjax.serve.scheduler import Scheduler


class ServeError(EpsjaxError):
    """A server setting that cannot work (one line, exit 2 from the command line)."""


def make_server(engine, *, model_name: str, num_slots: int, cache_len: int, max_queue: int = 64, steps: int = 2,
                tokenizer=None, api_key: str | None = None, warmup: bool = False) -> Server:
    """A Server (not yet listening; its scheduler thread started) over engine.open_slots(num_slots, cache_len).
    cache_len is the context: a prompt's length bucket plus its max_tokens must fit it. warmup: compile every
    program the scheduler can run first (warm_slots; server.warmup holds its programs and seconds)."""
    cfg = engine.cfg
    if not isinstance(cache_len, int) or not 2 <= cache_len <= cfg.max_seq_len:
        raise ServeError(f"the context length must be in [2, {cfg.max_seq_len}] (the model's maximum sequence "
                         f"length), got {cache_len!r}")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ServeError(f"max_queue must be an int >= 0, got {max_queue!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ServeError(f"steps must be a positive int, got {steps!r}")
    if api_key is not None and not api_key:
        raise ServeError("the API key is empty")
    metrics = Metrics()
    scheduler = Scheduler(engine, num_slots=num_slots, cache_len=cache_len, max_queue=max_queue, steps=steps,
                          tokenizer=tokenizer, metrics=metrics)
    records = warm_slots(scheduler) if warmup else None
    buckets = engine.buckets
    limits = Limits(vocab_size=cfg.vocab_size, context=cache_len,
                    bucket=None if buckets is None else buckets.length)
    server = Server(scheduler.start(), limits, model_name=model_name, tokenizer=tokenizer, api_key=api_key,
                    metrics=metrics)
    server.warmup = records
    return server


def warm_slots(scheduler: Scheduler) -> dict:
    """Compiles what the scheduler's slots can run, before any request (on the calling thread, before the
    scheduler's starts): for 1..max_admit requests prefilled at once and every prompt length bucket that leaves room
    for a token, the prefill and the insert of each number of them that take a slot (the others finish at their
    first token); the decode step; the release of 1..num_slots slots. Returns
    {"programs", "seconds"}."""
    g, slots = scheduler.generator, scheduler.slots
    filler = 0 if g.cfg.pad_token_id is None else int(g.cfg.pad_token_id)
    lengths = sorted({scheduler._entries(t) for t in range(1, scheduler.cache_len - 1)})
    lengths = [t for t in lengths if t + 2 <= scheduler.cache_len]
    start = time.perf_counter()
    with CompileCounter() as compiled:
        for n in range(1, min(scheduler.max_admit, scheduler.num_slots) + 1):
            for t in lengths:
                for k in range(1, n + 1):  # k of the n take a slot; the others finish at their first token
                    sampling = [SamplingParams(max_new_tokens=2)] * k + [SamplingParams(max_new_tokens=1)] * (n - k)
                    slots.insert([[filler] * t] * n, sampling, ids=list(range(n)), stop_at_eos=False)
                    slots.step(scheduler.steps)  # every one finishes: released
        for k in range(1, scheduler.num_slots + 1):
            slots.release(np.arange(k))
    return {"programs": compiled.programs, "seconds": time.perf_counter() - start}


class Background:
    """Runs a Server on its own event loop in a daemon thread: `with Background(server) as port:` (or start() ->
    port, stop()). Stopping closes the listener and stops the scheduler thread."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host, self.port = server, host, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="epsjax-http", daemon=True)
        self._runner = None

    def start(self, timeout: float = 30) -> int:
        self._thread.start()
        self._runner, self.port = asyncio.run_coroutine_threadsafe(
            start(self.server, self.host, self.port), self.loop).result(timeout)
        return self.port

    def stop(self, timeout: float = 30) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self.server.scheduler.stop(timeout)

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve_forever(server: Server, host: str, port: int, on_listening=None) -> None:
    """Listens until cancelled (Ctrl-C); on_listening(port) once the socket is bound."""
    runner, port = await start(server, host, port)
    if on_listening is not None:
        on_listening(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        server.scheduler.stop()


__all__ = ["Background", "Limits", "Metrics", "Scheduler", "Server", "ServeError", "make_server", "serve_forever",
           "warm_slots"]
