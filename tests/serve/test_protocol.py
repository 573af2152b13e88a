"""Request bodies -> CompletionRequest alone (no HTTP, no engine): defaults, what maps to SamplingParams, the
context check on the prompt's length bucket, and the field each refusal names."""

import pytest

from epsjax.serve.protocol import BadRequest, Limits, error_body, parse_completion

LIMITS = Limits(vocab_size=100, context=64, bucket=lambda t: max(16, 1 << (t - 1).bit_length()))


class Words:
    def encode(self, text):
        return type("E", (), {"ids": [len(w) for w in text.split()]})()


def test_defaults_and_mapping():
    r = parse_completion({"prompt": [1, 2]}, LIMITS)
    assert r.prompt == (1, 2) and r.sampling.max_new_tokens == 16 and r.sampling.temperature == 1.0
    assert (r.stream, r.include_usage, r.return_token_ids, r.stop_at_eos, r.stop) == (False, False, False, True, ())
    r = parse_completion({"prompt": [[7]], "max_tokens": 3, "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 9,
                          "stop_token_ids": [4], "ignore_eos": True, "stream": True,
                          "stream_options": {"include_usage": True}, "return_token_ids": True, "echo": False,
                          "logprobs": None, "n": 1}, LIMITS)
    assert r.prompt == (7,) and r.sampling.temperature == 0 and r.sampling.top_p == 0.5 and r.sampling.top_k == 0
    assert r.sampling.seed == 9 and r.sampling.stop_token_ids == (4,) and r.sampling.max_new_tokens == 3
    assert r.stream and r.include_usage and r.return_token_ids and not r.stop_at_eos


def test_text_prompts_and_stop_strings_need_a_tokenizer():
    r = parse_completion({"prompt": "ab cde", "stop": "x"}, LIMITS, Words())
    assert r.prompt == (2, 3) and r.stop == ("x",)
    for body, param in (({"prompt": "ab"}, "prompt"), ({"prompt": [1], "stop": ["x"]}, "stop")):
        with pytest.raises(BadRequest) as e:
            parse_completion(body, LIMITS)
        assert e.value.param == param and "tokenizer" in e.value.message


def test_the_context_counts_the_prompts_length_bucket():
    # 17 tokens take a 32-entry bucket: 32 + 32 fits the 64 context, 32 + 33 does not
    assert parse_completion({"prompt": [1] * 17, "max_tokens": 32}, LIMITS).sampling.max_new_tokens == 32
    with pytest.raises(BadRequest) as e:
        parse_completion({"prompt": [1] * 17, "max_tokens": 33}, LIMITS)
    assert e.value.code == "context_length_exceeded" and "32 cache entries" in e.value.message


def test_error_body_shape():
    assert error_body("m", param="p") == {"error": {"message": "m", "type": "invalid_request_error", "param": "p",
                                                    "code": None}}
