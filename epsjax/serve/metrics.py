"""The server's Prometheus metrics, in a registry of their own (two servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """requests by outcome (finished, cancelled, failed, rejected, invalid, unauthorized), running and waiting
    requests, slots in use, time to first token, time per output token, prompt and generated tokens."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("epsjax_requests", "Requests by outcome", ["outcome"], registry=r)
        self.running = Gauge("epsjax_requests_running", "Requests in a decode slot", registry=r)
        self.waiting = Gauge("epsjax_requests_waiting", "Requests waiting for a slot", registry=r)
        self.slots_used = Gauge("epsjax_slots_used", "Decode slots in use", registry=r)
        self.slots_total = Gauge("epsjax_slots_total", "Decode slots", registry=r)
        self.ttft = Histogram("epsjax_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("epsjax_time_per_output_token_seconds", "Mean seconds per token after the first, per "
                              "request", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("epsjax_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("epsjax_generation_tokens", "Generated tokens", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
