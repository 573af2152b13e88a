"""OpenAI request bodies -> checked requests, and errors -> OpenAI error bodies. No HTTP, no engine: plain data.

    parse_completion(body, limits, tokenizer) -> CompletionRequest    (a BadRequest names the field on bad input)
    error_body(message, type, param, code) -> {"error": {...}}        (what every non-2xx answer carries)

Supported fields of /v1/completions: model (any string: one model is served), prompt (text, with a tokenizer, or a
list of token ids, or a list holding one of them), max_tokens (default 16), temperature, top_p, top_k (vLLM), seed,
stop (a string or up to 4), stop_token_ids (vLLM), ignore_eos (vLLM), stream, stream_options.include_usage, n (1
only), return_token_ids (vLLM: token ids with each choice and chunk), echo false, logprobs null. Anything else that
changes the output is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math

from epsjax.generation import MAX_STOP_IDS, SEED_LIMIT, RequestError, SamplingParams

MAX_STOP_STRINGS = 4
# Fields clients send with their defaults; accepted when they change nothing.
_NEUTRAL = {"echo": (False, None), "logprobs": (None,), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "user": None, "suffix": (None,), "logit_bias": (None, {})}


class BadRequest(Exception):
    """A request the server refuses with 400: the message, and the field it concerns (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served deployment can take: its vocabulary, the slots' context (prompt bucket + max_tokens), and
    how a prompt of T tokens is rounded up (the generator's length bucket)."""

    vocab_size: int
    context: int
    bucket: object = None  # callable: prompt tokens -> cache entries it takes (default: itself)

    def prompt_entries(self, tokens: int) -> int:
        return tokens if self.bucket is None else self.bucket(tokens)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompt: tuple[int, ...]
    sampling: SamplingParams          # max_new_tokens set
    stop: tuple[str, ...]
    stop_at_eos: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str | None


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, kind: str, default):
    """body[name] checked against kind ('int', 'number', 'bool', 'str'); None or absent: default."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _integer, "number": _number, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind](value)
    if not ok or (kind == "number" and not math.isfinite(value)):
        what = {"int": "an integer", "number": "a finite number", "bool": "a boolean", "str": "a string"}[kind]
        raise BadRequest(f"{name} must be {what}, got {value!r}", name)
    return value


def _prompt_ids(prompt, limits: Limits, tokenizer) -> tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer.json: give the prompt as a list of token ids", "prompt")
        ids = tokenizer.encode(prompt).ids
    elif isinstance(prompt, list) and prompt and all(_integer(t) for t in prompt):
        ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest(f"one prompt per request (n=1, no batches), got {len(prompt)}", "prompt")
    else:
        raise BadRequest("prompt must be a string or a non-empty list of integer token ids", "prompt")
    if not ids:
        raise BadRequest("the prompt tokenizes to no tokens", "prompt")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise BadRequest(f"prompt has token ids outside the vocabulary [0, {limits.vocab_size}): {bad[:10]}", "prompt")
    return tuple(int(t) for t in ids)


def parse_completion(body, limits: Limits, tokenizer=None) -> CompletionRequest:
    """A /v1/completions body (parsed JSON) as a CompletionRequest, or a BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, neutral in _NEUTRAL.items():
        if neutral is not None and name in body and body[name] not in neutral:
            raise BadRequest(f"{name}={body[name]!r} is not supported by this server", name)
    if "prompt" not in body:
        raise BadRequest("prompt is required", "prompt")
    prompt = _prompt_ids(body["prompt"], limits, tokenizer)
    n = _get(body, "n", "int", 1)
    if n != 1:
        raise BadRequest(f"n must be 1 (one choice per request), got {n}", "n")
    max_tokens = _get(body, "max_tokens", "int", 16)
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    entries = limits.prompt_entries(len(prompt))
    if entries + max_tokens > limits.context:
        raise BadRequest(f"the prompt ({len(prompt)} tokens, {entries} cache entries) plus max_tokens {max_tokens} "
                         f"exceeds the context length {limits.context}", "max_tokens",
                         code="context_length_exceeded")
    seed = _get(body, "seed", "int", 0)
    if not 0 <= seed < SEED_LIMIT:
        raise BadRequest(f"seed must be in [0, 2**32), got {seed}", "seed")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    if stop and tokenizer is None:
        raise BadRequest("stop strings need a tokenizer (this model has none): use stop_token_ids", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_integer(t) and 0 <= t < limits.vocab_size for t in stop_ids):
        raise BadRequest(f"stop_token_ids must be a list of token ids in [0, {limits.vocab_size})", "stop_token_ids")
    if len(stop_ids) > MAX_STOP_IDS - 1:
        raise BadRequest(f"at most {MAX_STOP_IDS - 1} stop_token_ids, got {len(stop_ids)}", "stop_token_ids")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    stream = _get(body, "stream", "bool", False)
    include_usage = _get(options or {}, "include_usage", "bool", False)
    try:
        sampling = SamplingParams(temperature=float(_get(body, "temperature", "number", 1.0)),
                                  top_p=float(_get(body, "top_p", "number", 1.0)),
                                  top_k=max(0, _get(body, "top_k", "int", 0)), seed=seed,
                                  max_new_tokens=max_tokens, stop_token_ids=tuple(stop_ids))
    except RequestError as e:
        raise BadRequest(str(e), str(e).split(" ", 1)[0]) from None
    return CompletionRequest(prompt=prompt, sampling=sampling, stop=tuple(stop),
                             stop_at_eos=not _get(body, "ignore_eos", "bool", False), stream=stream,
                             include_usage=include_usage,
                             return_token_ids=_get(body, "return_token_ids", "bool", False),
                             model=_get(body, "model", "str", None))
