"""Servers for the tests: in-process (epsjax.serve.Background: its own event loop and the scheduler thread) on
127.0.0.1 and a free port, always stopped by the fixture."""

import json
import urllib.error
import urllib.request

import openai


def client(port, api_key="unused"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=30)


def http(port, path, body=None, *, raw=None, headers=None, timeout=30):
    """(status, parsed JSON or text) of a GET (no body) or a POST of body (JSON) or raw bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(port, name, **labels):
    """A sample's value from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http(port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0
