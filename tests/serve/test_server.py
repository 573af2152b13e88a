"""The server over a real engine (tiny-mixtral, random weights, token-id prompts): what the openai client gets,
streamed and not, equals the offline generate of each prompt alone, however requests arrive; bad input answers 400
with an OpenAI error body and the server keeps serving; /metrics counts the requests."""

import threading
import time

import pytest
from flax import nnx

from epsjax.engine import Engine
from epsjax.models import MoETransformer, get_preset
from epsjax.serve import Background, make_server
from tests.serve.conftest import client, http, metric

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 101], [250, 1, 64, 64, 3, 9, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
           [3], [11, 12, 13, 14], [200, 100, 50]]
NEW = [6, 9, 4, 12, 7, 5]


@pytest.fixture(scope="module")
def served():
    engine = Engine(MoETransformer(get_preset("tiny-mixtral"), rngs=nnx.Rngs(0)))
    want = [engine.generate([p], max_new_tokens=n).tokens[0] for p, n in zip(PROMPTS, NEW)]  # each alone
    background = Background(make_server(engine, model_name="tiny", num_slots=4, cache_len=64, max_queue=16))
    port = background.start()
    yield port, want
    background.stop(30)


def greedy(port, i, **kw):
    return client(port).completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=NEW[i], temperature=0,
                                           extra_body={"return_token_ids": True}, **kw)


def test_a_completion_equals_offline_generate(served):
    port, want = served
    out = greedy(port, 0)
    assert out.choices[0].token_ids == want[0]
    assert out.choices[0].finish_reason == "length" and out.choices[0].text == ""  # no tokenizer: ids only
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPTS[0]), NEW[0])


def test_a_streamed_completion_equals_offline_generate(served):
    port, want = served
    chunks = list(greedy(port, 1, stream=True, stream_options={"include_usage": True}))
    tokens = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert tokens == want[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW[1]


def test_staggered_concurrent_requests_each_equal_their_prompt_alone(served):
    port, want = served
    got, errors = {}, []

    def run(i):
        try:
            time.sleep(0.03 * i)  # arrivals while others decode; 6 requests for 4 slots
            if i % 2:
                chunks = greedy(port, i, stream=True)
                got[i] = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
            else:
                got[i] = greedy(port, i).choices[0].token_ids
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert metric(port, "epsjax_requests_running") == 0 and metric(port, "epsjax_slots_used") == 0


@pytest.mark.parametrize("raw, param", [
    (b"{not json", None),
    (b"[" * 100_000, None),  # nesting deeper than the parser's recursion
    (b'["a list"]', None),
    (b'{"max_tokens": 4}', "prompt"),
    (b'{"prompt": "text without a tokenizer"}', "prompt"),
    (b'{"prompt": [1, 2, 256]}', "prompt"),
    (b'{"prompt": [1, -1]}', "prompt"),
    (b'{"prompt": [1.5]}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": [1], "max_tokens": "4"}', "max_tokens"),
    (b'{"prompt": [1], "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": [1], "max_tokens": 60}', "max_tokens"),  # 16 cache entries + 60 > the 64 of the slots
    (b'{"prompt": [1], "temperature": NaN}', "temperature"),
    (b'{"prompt": [1], "temperature": -1}', "temperature"),
    (b'{"prompt": [1], "top_p": 0}', "top_p"),
    (b'{"prompt": [1], "seed": 4294967296}', "seed"),
    (b'{"prompt": [1], "n": 2}', "n"),
    (b'{"prompt": [1], "stream": "yes"}', "stream"),
    (b'{"prompt": [1], "stop": "x"}', "stop"),
    (b'{"prompt": [1], "logprobs": 3}', "logprobs"),
    (b'{"prompt": [[1], [2]]}', "prompt"),
])
def test_bad_input_answers_400_and_the_server_goes_on(served, raw, param):
    port, want = served
    status, body = http(port, "/v1/completions", raw=raw)
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_after_bad_input_the_server_serves_and_metrics_count(served):
    port, want = served
    assert greedy(port, 5).choices[0].token_ids == want[5]
    assert metric(port, "epsjax_requests_total", outcome="invalid") >= 21
    assert metric(port, "epsjax_requests_total", outcome="finished") >= 1
    assert metric(port, "epsjax_generation_tokens_total") >= NEW[5]
    assert metric(port, "epsjax_time_to_first_token_seconds_count") >= 1
    status, body = http(port, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert status == 400 and "chat template" in body["error"]["message"]
    assert http(port, "/health") == (200, {"status": "ok"})


def test_sampled_requests_follow_their_seed(served):
    port, _ = served
    c = client(port)
    ask = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, extra_body={"return_token_ids": True})
    a, b = (c.completions.create(seed=7, **ask).choices[0].token_ids for _ in range(2))
    other = c.completions.create(seed=8, **ask).choices[0].token_ids
    assert a == b and a != other
