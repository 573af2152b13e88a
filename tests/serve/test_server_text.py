"""The server over a checkpoint with a tokenizer.json (checkpoints/pystdlib-moe): text prompts, text out (streamed
text equals the whole), stop strings cut the text, token ids equal offline generate."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from epsjax.deployment import DeploymentSpec, RequestShape, build
from epsjax.serve import Background, make_server
from tests.serve.conftest import client, http

CHECKPOINT = Path(__file__).parents[2] / "checkpoints" / "pystdlib-moe"
PROMPT = "import os\n\n\ndef read_lines(path):\n    "
NEW = 16


@pytest.fixture(scope="module")
def served():
    deployment = build(DeploymentSpec(model=str(CHECKPOINT), dtype="float32"), RequestShape(batch=2),
                       progress=False)
    tokenizer = Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))
    want = deployment.engine.generate([tokenizer.encode(PROMPT).ids], max_new_tokens=NEW).tokens[0]
    background = Background(make_server(deployment.engine, model_name="pystdlib-moe", num_slots=2, cache_len=128,
                                        tokenizer=tokenizer))
    port = background.start()
    yield port, tokenizer, want
    background.stop(30)


def test_text_in_text_out_equals_offline_generate(served):
    port, tokenizer, want = served
    c = client(port)
    out = c.completions.create(model="pystdlib-moe", prompt=PROMPT, max_tokens=NEW, temperature=0,
                               extra_body={"return_token_ids": True})
    assert out.choices[0].token_ids == want
    assert out.choices[0].text == tokenizer.decode(want) and len(out.choices[0].text) >= 8
    streamed = c.completions.create(model="pystdlib-moe", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == out.choices[0].text


def test_a_stop_string_cuts_the_text(served):
    port, tokenizer, want = served
    text = tokenizer.decode(want)
    stop = text[5:8]
    for stream in (False, True):
        out = client(port).completions.create(model="pystdlib-moe", prompt=PROMPT, max_tokens=NEW, temperature=0,
                                              stop=[stop, "\x00never"], stream=stream)
        chunks = list(out) if stream else [out]
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == text[:text.find(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_chat_without_a_template_answers_400(served):
    port, _, _ = served
    status, body = http(port, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "chat template" in body["error"]["message"]
