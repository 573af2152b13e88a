"""Engine.generate decodes on the device (chunks of decode_chunk steps, sampling and EOS inside the loop); its
tokens and MoE statistics equal a host loop of prefill, decode_step and sample (the path it replaced)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from epsjax.engine import Engine, SamplingParams
from tests.runtime.reference_sampler import sample
from epsjax.models import MoETransformer, get_preset

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 101], [250, 1, 64, 64, 3, 9, 12]]


@pytest.fixture(scope="module")
def model():
    return MoETransformer(get_preset("tiny-qwen3-moe"), rngs=nnx.Rngs(3))


def host_loop(engine: Engine, prompts, max_new_tokens: int, sampling: SamplingParams, eos: int | None):
    """The reference: one decode_step per token, each sequence sampling from its own stream (fold_in(key(seed),
    token index)) as a batch of one would, EOS per sequence."""
    tokens_BT, mask_BT = engine.pad_prompts(prompts)
    T = tokens_BT.shape[1]
    cache_len = min(engine.cfg.max_seq_len, -(-(T + max_new_tokens) // 64) * 64)
    logits, state, stats = engine.prefill(tokens_BT, mask_BT, cache_len=cache_len)
    per_expert = np.asarray(stats.tokens_per_expert, np.int64)

    def draw(logits, step):
        return np.array([np.asarray(sample(logits[i:i + 1], jax.random.fold_in(jax.random.key(sampling.seed), step),
                                           sampling))[0] for i in range(len(prompts))])

    nxt = draw(logits, 0)
    out, finished = [[] for _ in prompts], np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt):
            if not finished[i]:
                out[i].append(int(t))
                finished[i] = eos is not None and t == eos
        if finished.all() or step == max_new_tokens - 1:
            break
        logits, state, stats = engine.decode_step(state, nxt)
        per_expert += np.asarray(stats.tokens_per_expert)
        nxt = draw(logits, step + 1)
    return out, per_expert


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7)],
                         ids=["greedy", "top_p_seed7"])
@pytest.mark.parametrize("chunk", [4, 32])
def test_generate_equals_the_host_loop(model, sampling, chunk):
    engine = Engine(model, decode_chunk=chunk)
    want, want_per_expert = host_loop(engine, PROMPTS, 11, sampling, eos=None)
    result = engine.generate(PROMPTS, max_new_tokens=11, sampling=sampling, stop_at_eos=False)
    assert result.tokens == want
    assert all(len(t) == 11 for t in result.tokens)
    np.testing.assert_array_equal(result.tokens_per_expert, want_per_expert)
    assert result.generated_tokens == 33


@pytest.mark.parametrize("chunk", [2, 32])
def test_eos_inside_the_device_loop(model, chunk):
    # Pick as EOS the token sequence 0 produces at step 3 (and nowhere earlier): sequence 0 must stop there,
    # the others go on until they meet it or the budget ends, and decoding stops once all have finished.
    free, _ = host_loop(Engine(model), PROMPTS, 9, SamplingParams(), eos=None)
    eos = free[0][3]
    assert eos not in free[0][:3]
    cfg = dataclasses.replace(model.cfg, eos_token_id=eos)
    graphdef, state = nnx.split(model)
    eos_model = nnx.merge(graphdef, state)
    eos_model.cfg = cfg
    engine = Engine(eos_model, decode_chunk=chunk)
    want, want_per_expert = host_loop(engine, PROMPTS, 9, SamplingParams(), eos=eos)
    result = engine.generate(PROMPTS, max_new_tokens=9)
    assert result.tokens == want
    assert result.tokens[0] == free[0][:4] and result.tokens[0][-1] == eos
    np.testing.assert_array_equal(result.tokens_per_expert, want_per_expert)


def test_every_sequence_finishing_stops_decoding(model):
    # With the first greedy token of every prompt as EOS... only prompts whose first token it is stop at once;
    # here a single prompt: it stops after the prefill's token, with no decode step run.
    free, _ = host_loop(Engine(model), PROMPTS[:1], 4, SamplingParams(), eos=None)
    graphdef, state = nnx.split(model)
    eos_model = nnx.merge(graphdef, state)
    eos_model.cfg = dataclasses.replace(model.cfg, eos_token_id=free[0][0])
    result = Engine(eos_model).generate(PROMPTS[:1], max_new_tokens=4)
    assert result.tokens == [[free[0][0]]] and result.decode_seconds < 1.0


def test_decode_chunk_must_be_positive(model):
    with pytest.raises(ValueError, match="decode_chunk must be a positive int"):
        Engine(model, decode_chunk=0)
