"""The HTTP layer over the fake generator (tests/serve/fake.py), where a slow step makes timing deterministic: a
full queue answers 429, the API key guards every endpoint but /health, a client that goes away mid-stream frees
its slot, bodies over the limit are refused."""

import http.client as httplib
import json
import threading
import time

import openai
import pytest

from epsjax.serve import Background, Limits, Metrics, Scheduler, Server
from tests.serve.conftest import client, http, metric
from tests.serve.fake import FakeGenerator, expected


def fake_server(step_seconds=0.0, **kw):
    metrics = Metrics()
    scheduler = Scheduler(FakeGenerator(step_seconds), num_slots=kw.pop("num_slots", 2), cache_len=64,
                          max_queue=kw.pop("max_queue", 8), metrics=metrics).start()
    return Server(scheduler, Limits(vocab_size=100, context=64), model_name="fake", metrics=metrics, **kw)


@pytest.fixture
def serve():
    running = []

    def serve(server):
        background = Background(server)
        running.append(background)
        return background.start()
    yield serve
    for background in running:
        background.stop(10)


def test_completions_through_the_openai_client(serve):
    port = serve(fake_server())
    out = client(port).completions.create(model="fake", prompt=[3, 4], max_tokens=5,
                                          extra_body={"return_token_ids": True})
    assert out.choices[0].token_ids == expected([3, 4], 5) and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 5
    assert [m.id for m in client(port).models.list().data] == ["fake"]


def test_a_full_queue_answers_429(serve):
    port = serve(fake_server(step_seconds=0.05, num_slots=1, max_queue=1))
    results = {}

    def post(name, max_tokens):
        results[name] = http(port, "/v1/completions", {"prompt": [1], "max_tokens": max_tokens})

    first = threading.Thread(target=post, args=("first", 40))
    first.start()
    deadline = time.monotonic() + 10
    while metric(port, "epsjax_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=post, args=("second", 2))
    second.start()
    while metric(port, "epsjax_requests_waiting") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, body = http(port, "/v1/completions", {"prompt": [1], "max_tokens": 2})
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and "queue is full" in body["error"]["message"]
    first.join(10)
    second.join(10)
    assert results["first"][0] == 200 and results["second"][0] == 200
    assert metric(port, "epsjax_requests_total", outcome="rejected") == 1


def test_the_api_key_guards_all_but_health(serve):
    port = serve(fake_server(api_key="sesame"))
    assert http(port, "/health")[0] == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        status, body = http(port, "/v1/models", headers=headers)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert http(port, "/v1/completions", {"prompt": [1]}, headers=headers)[0] == 401
        assert http(port, "/metrics", headers=headers)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(port, "wrong").completions.create(model="fake", prompt=[1], max_tokens=2)
    out = client(port, "sesame").completions.create(model="fake", prompt=[1], max_tokens=2)
    assert out.usage.completion_tokens == 2


def test_a_client_gone_mid_stream_frees_its_slot(serve):
    port = serve(fake_server(step_seconds=0.05))
    conn = httplib.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1], "max_tokens": 60, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert metric(port, "epsjax_requests_running") == 1
    conn.close()  # 60 tokens take 1.5 s; the cancel comes long before
    deadline = time.monotonic() + 1.0
    while metric(port, "epsjax_requests_running") or metric(port, "epsjax_slots_used"):
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)
    assert metric(port, "epsjax_requests_total", outcome="cancelled") == 1
    assert metric(port, "epsjax_requests_total", outcome="finished") == 0
    assert http(port, "/v1/completions", {"prompt": [1], "max_tokens": 2})[0] == 200  # still serving


def test_a_body_over_the_limit_is_refused(serve):
    port = serve(fake_server(max_body=1000))
    status, body = http(port, "/v1/completions", raw=b'{"prompt": [' + b"1, " * 2000 + b"1]}")
    assert status == 413 and "limit" in body["error"]["message"]
    assert http(port, "/v1/completions", {"prompt": [1], "max_tokens": 1})[0] == 200


def test_unknown_paths_and_methods_answer_error_bodies(serve):
    port = serve(fake_server())
    status, body = http(port, "/v1/nothing")
    assert status == 404 and "error" in body
    status, body = http(port, "/v1/completions")  # GET
    assert status == 405 and "error" in body


def test_a_stopped_scheduler_answers_503(serve):
    server = fake_server()
    port = serve(server)
    server.scheduler.stop(5)
    status, body = http(port, "/health")
    assert status == 503 and body["error"]["type"] == "server_error"
    status, body = http(port, "/v1/completions", {"prompt": [1]})
    assert status == 503 and "shutting down" in body["error"]["message"]
